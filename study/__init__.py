"""The study: style LoRAs against the DreamBooth baseline and plain img2img, trained, stylised on ComfyUI,
scored and reported by one resumable command (`stylora study`)."""
