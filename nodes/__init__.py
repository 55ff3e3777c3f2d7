"""ComfyUI node declarations. Plain V1 node classes; `comfy` is imported only inside the functions
that need it, so this package imports (and is tested) without ComfyUI."""

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
