"""The `stylora` command. A thin layer: arguments in, library calls, printed results out.

    stylora train lora --data DIR --output FILE.safetensors [options]
    stylora train dreambooth --data DIR --output FILE.safetensors [options]
    stylora train textual-inversion --data DIR --output FILE.safetensors [options]
    stylora costs A.resources.json B.resources.json
    stylora lora info FILE.safetensors
    stylora eval --content DIR --styled DIR [DIR ...] --style DIR --out DIR
    stylora prepare wikiart --source DIR --style NAME [--artist NAME] --count N --out DIR
    stylora prepare coco --source DIR --count N --out DIR
    stylora prepare stats DIR ... [--out DIR]
    stylora run --server URL --workflow NAME --content IMG|DIR --style NAME [--strength S] [--mask IMG] --out PATH
    stylora study --config study.toml [flags override the file]
    stylora adain --content IMG --style IMG --out IMG [--alpha A]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import typing
from pathlib import Path

from .baseline.config import AdaINConfig
from .core.files import atomic_write_text
from .core.settings import add_config_arguments, build_config
from .core.version import __version__
from .data.prepare import PrepareConfig
from .eval.config import EvalConfig
from .study.config import CalibrateConfig, add_study_arguments, load_study_config
from .study.inputs import check_inputs as check_study_inputs
from .trainer.config import DreamBoothConfig, LoraTrainConfig, TextualInversionConfig
from .workflows.client import RunConfig, bundled_workflows

# Seconds per training step of full-size SD1.5 at 512 px, the default batch of 2, on 2 CPU cores: 67 s measured at
# 256 px (benchmarks/train_node_memory.py, see README), times 4 for four times the pixels. The basis of the estimate
# printed when no GPU is found; a GPU is hundreds of times faster.
CPU_SECONDS_PER_STEP = 270.0
EXIT_RUNTIME = 1  # the command ran and failed (I/O, a damaged file, a diverged run, out of memory)
EXIT_USAGE = 2  # the command line or the inputs it names are wrong
# Errors the library raises about the inputs the user named (paths, settings, files): a usage error.
USAGE_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError)
# The files and folders each command reads, checked before the heavy libraries load (torch and diffusers take
# seconds to import): (setting, "file" | "folder" | "path", what is accepted). Lists are checked item by item.
PAINTINGS = "a folder of paintings, searched recursively; e.g. examples/paintings or one from `stylora prepare wikiart`"
INPUT_PATHS: dict[tuple[str, str | None], tuple[tuple[str, str, str], ...]] = {
    **{("train", what): (("data", "folder", PAINTINGS),) for what in ("lora", "dreambooth", "textual-inversion")},
    ("eval", None): (("content", "folder", "a folder of content photos"),
                     ("styled", "folder", "folders of stylised outputs"), ("style", "folder", "a folder of paintings")),
    ("prepare", "wikiart"): (("source", "path", "a WikiArt folder or parquet file"),),
    ("prepare", "coco"): (("source", "folder", "a COCO image folder, e.g. coco/val2017"),),
    ("prepare", "stats"): (("folders", "folder", "image folders"),),
    ("lora", "info"): (("file", "file", "a .safetensors LoRA file; pickled .ckpt/.pt are refused, they can run code"),),
    ("adain", None): (("content", "file", "a photo"), ("style", "file", "a painting")),
    ("calibrate", None): (("style", "file", "the style's .safetensors file"),
                          ("content", "path", "a photo or a folder of photos")),
    ("run", None): (("content", "path", "a photo or a folder of photos"), ("mask", "file", "a mask image"),
                    ("style_image", "file", "a painting")),
}
MEMORY_HINTS = {
    "train": "lower --batch-size (raise --grad-accum to keep the effective batch) or --resolution, or add "
             "--gradient-checkpointing, --mixed-precision fp16, --use-8bit-adam; keep latent caching on "
             "(--no-cache-latents costs memory)",
    "eval": "pass --device cpu, or score smaller images",
}


class Parser(argparse.ArgumentParser):
    """argparse with the command's one-line error format: `stylora: error: <what> (<what to do>)`, exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"stylora: error: {message} (see `{self.prog} --help`)\n")


def add_trainer_arguments(parser: argparse.ArgumentParser, config: type, resume_help: str) -> None:
    """What every `stylora train` recipe takes: --config, --resume, --overwrite, --no-progress, then its settings."""
    parser.add_argument("--config", help="JSON or TOML file of settings; flags override it")
    parser.add_argument("--resume", action="store_true", help=resume_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output and its checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    add_config_arguments(parser, config)


def make_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="stylora", description="Stylora: style LoRAs for Stable Diffusion 1.5")
    parser.add_argument("--version", action="version", version=f"stylora {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a style")
    train_sub = train.add_subparsers(dest="what", required=True)
    lora = train_sub.add_parser("lora", help="train a style LoRA from a folder of paintings")
    add_trainer_arguments(lora, LoraTrainConfig,
                          resume_help="continue from the newest complete checkpoint next to --output")
    db = train_sub.add_parser("dreambooth", help="DreamBooth with prior preservation (the comparison baseline)",
                              description="Writes a single-file SD1.x checkpoint (or, with --lora, a DreamBooth-LoRA) "
                                          "and <output>.resources.json with its training cost.")
    add_trainer_arguments(db, DreamBoothConfig, resume_help="continue from the newest complete checkpoint")
    ti = train_sub.add_parser("textual-inversion", help="Textual Inversion: a style token embedding (Gal et al. 2023)",
                              description="Writes an embedding (.safetensors, key emb_params) that ComfyUI loads as "
                                          "embedding:<name> from models/embeddings, A1111 as <name>, diffusers with "
                                          "load_textual_inversion; and <output>.resources.json.")
    add_trainer_arguments(ti, TextualInversionConfig, resume_help="continue from the newest complete checkpoint")
    costs = sub.add_parser("costs", help="compare training costs from <output>.resources.json records")
    costs.add_argument("records", nargs="+", metavar="FILE", help="*.resources.json written by the trainers")
    costs.add_argument("--out", help="also write the table to this Markdown file")

    ev = sub.add_parser("eval", help="score stylised images: SSIM, LPIPS, content and Gram losses, FID/KID/ArtFID",
                        description="Pairs each image in --styled with the --content photo of the same file stem "
                                    "and writes report.json, report.csv, report.md, plots and grid.png to --out. "
                                    "Several --styled folders are compared side by side.")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    add_config_arguments(ev, EvalConfig)

    prep = sub.add_parser("prepare", help="prepare WikiArt style folders and COCO content sets; dataset statistics")
    prep_sub = prep.add_subparsers(dest="what", required=True)
    wiki = prep_sub.add_parser("wikiart", help="select, de-duplicate and crop one WikiArt style for training",
                               description="Reads the Kaggle layout (<root>/<Style>/<artist>_<title>.jpg) or the "
                                           "Hugging Face parquet layout (style/artist/genre labels).")
    coco = prep_sub.add_parser("coco", help="select and crop COCO 2017 val photos as the evaluation content set")
    for p in (wiki, coco):
        p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    add_config_arguments(wiki, PrepareConfig,
                         help_overrides={"source": "WikiArt root: Kaggle style folders or Hugging Face parquet files"})
    add_config_arguments(coco, PrepareConfig, exclude=("style", "artist"),
                         help_overrides={"source": "COCO 2017 image folder (e.g. coco/val2017)"})
    stats = prep_sub.add_parser("stats", help="counts per style, size/aspect histograms, sample grid, summary.md")
    stats.add_argument("folders", nargs="+", metavar="DIR", help="image folders (prepared or not)")
    stats.add_argument("--out", default="dataset-stats", help="folder for the plots and summary (default: %(default)s)")

    run = sub.add_parser("run", help="run a bundled workflow headless on a ComfyUI server",
                         description="Uploads the photo(s), fills them and the style into a bundled API workflow, "
                                     "queues it, waits and downloads the result. A folder as --content is a batch; "
                                     "rerunning it skips photos whose output exists.")
    run.add_argument("--list", action="store_true", help="list the bundled workflows and exit")
    add_config_arguments(run, RunConfig, exclude=("server",))
    run.add_argument("--server", dest="server", action="extend", nargs="+", default=argparse.SUPPRESS,
                     help="ComfyUI server URL(s), repeatable; photos are spread over them (default: "
                          "http://127.0.0.1:8188)")

    study = sub.add_parser("study", help="the comparison study: train, stylise on ComfyUI, score, report",
                           description="Trains what the methods need per style, stylises every content photo with "
                                       "every method at every strength on the ComfyUI server(s), scores them and "
                                       "writes <out>/report/. Rerun the same command to continue a killed study.")
    add_study_arguments(study)

    cal = sub.add_parser("calibrate", help="measure a style's SSIM against strength and store it in the style file",
                         description="Stylises the content photos at each strength on the ComfyUI server (the "
                                     "style's calibration off), measures the mean SSIM to the photos and writes the "
                                     "curve into the style file's metadata (weights unchanged). Style Strength then "
                                     "maps strength so it gives the same SSIM for every calibrated style.")
    cal.add_argument("style", help=CalibrateConfig.__dataclass_fields__["style"].metadata["help"])
    add_config_arguments(cal, CalibrateConfig, exclude=("style", "server"))
    cal.add_argument("--server", dest="server", action="extend", nargs="+", default=argparse.SUPPRESS,
                     help="ComfyUI server URL(s), repeatable (default: http://127.0.0.1:8188)")
    adain = sub.add_parser("adain", help="the classical baseline: AdaIN style transfer of one photo (no ComfyUI)",
                           description="Huang and Belongie (ICCV 2017) with the published weights vgg_normalised.pth "
                                       "and decoder.pth (see README, AdaIN baseline).")
    add_config_arguments(adain, AdaINConfig)

    info = sub.add_parser("lora", help="inspect LoRA files")
    info_sub = info.add_subparsers(dest="what", required=True)
    show = info_sub.add_parser("info", help="print a LoRA file's metadata and shape")
    show.add_argument("file", nargs="+", help=".safetensors LoRA file(s)")
    return parser


def _quiet_libraries() -> None:
    # transformers warns about torchvision on import; diffusers/transformers print loading bars.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def check_inputs(command: tuple[str, str | None], settings: object) -> None:
    """Refuse a missing file or folder named on the command line (INPUT_PATHS) at once, naming the flag, the path
    and what is accepted: before torch and diffusers load, so a typo costs no wait."""
    for name, kind, accepted in INPUT_PATHS.get(command, ()):
        value = getattr(settings, name, None)
        flag = {"file": "FILE", "folders": "DIR"}.get(name, "--" + name.replace("_", "-"))  # positionals: metavar
        for item in value if isinstance(value, list | tuple) else [] if value is None else [value]:
            path = Path(item)
            ok = {"file": path.is_file, "folder": path.is_dir, "path": path.exists}[kind]()
            if not ok:
                what = {"file": "no such file", "folder": "not a folder", "path": "no such file or folder"}[kind]
                raise FileNotFoundError(f"{flag} {item}: {what} (expected {accepted})")


def check_base_model(source: str) -> None:
    """A local --base-model must exist; a hub id not in the Hugging Face cache is about to be downloaded: say so,
    and what to pass offline, before the download starts."""
    local = Path(source).expanduser()
    if local.exists():
        return
    hub_id = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not hub_id or local.suffix.lower() in (".safetensors", ".ckpt"):
        raise FileNotFoundError(f"--base-model {source}: no such file or folder (expected a single-file SD1.5 "
                                ".safetensors, a diffusers folder, or a hub id such as "
                                "stable-diffusion-v1-5/stable-diffusion-v1-5)")
    from huggingface_hub import try_to_load_from_cache  # light: no torch

    if not isinstance(try_to_load_from_cache(source, "model_index.json"), str):
        print(f"stylora: --base-model {source} is not in the Hugging Face cache: downloading it (about 4 GB). "
              "Offline, pass --base-model with a local SD1.5 checkpoint instead, e.g. "
              "--base-model ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors", file=sys.stderr)


def say_device(cfg: LoraTrainConfig | DreamBoothConfig | TextualInversionConfig) -> None:
    """Without a GPU, say what a run of these settings costs and what a first try on a CPU should pass."""
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        return
    minutes = cfg.steps * CPU_SECONDS_PER_STEP * (cfg.resolution / 512) ** 2 / 60
    took = f"{minutes / 60:.0f} hours" if minutes >= 120 else f"{max(1.0, minutes):.0f} minutes"
    hint = "; for a first try pass --steps 20 --resolution 256 (see README, Set-up)" if minutes > 60 else ""
    print(f"stylora: no GPU found: {cfg.steps} steps at {cfg.resolution} px run on the CPU, about {took} on 2 cores"
          f"{hint}", file=sys.stderr)


def prepare_training(args: argparse.Namespace, config: type) -> typing.Any:
    """The settings of a `stylora train` recipe, its data folder and base model checked before the heavy imports."""
    cfg = build_config(config, args)
    check_inputs(("train", args.what), cfg)
    check_base_model(cfg.base_model)
    say_device(cfg)
    return cfg


def cmd_train_lora(args: argparse.Namespace) -> int:
    cfg = prepare_training(args, LoraTrainConfig)
    # heavy: diffusers, peft and accelerate take seconds to import; `stylora --help` should not wait for them
    from .trainer.lora import train_lora

    result = train_lora(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    _print_result(result)
    return 0


def _print_result(result) -> None:
    """What a training run did: skipped files, where it resumed, what it wrote and what it cost. Printed once,
    by the main process, under `accelerate launch`."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    if result.skipped:
        print(f"Skipped {len(result.skipped)} file(s):")
        for s in result.skipped:
            print(f"  {s.path}: {s.reason}")
    if result.resumed_from:
        print(f"Resumed from step {result.resumed_from}; finished at step {result.steps}.")
    size = result.output.stat().st_size / 1e6
    print(f"Wrote {result.output} ({size:.2f} MB) after {result.steps} steps in {result.seconds:.0f} s; "
          f"final loss {result.final_loss:.4f}; peak memory {result.peak_memory_mb:.0f} MB "
          f"(cost record: {result.output.stem}.resources.json)")


def cmd_train_dreambooth(args: argparse.Namespace) -> int:
    cfg = prepare_training(args, DreamBoothConfig)
    # heavy: diffusers, peft and accelerate take seconds to import; `stylora --help` should not wait for them
    from .trainer.dreambooth import train_dreambooth

    result = train_dreambooth(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    _print_result(result)
    return 0


def cmd_train_textual_inversion(args: argparse.Namespace) -> int:
    cfg = prepare_training(args, TextualInversionConfig)
    # heavy: diffusers, peft and accelerate take seconds to import; `stylora --help` should not wait for them
    from .trainer.textual_inversion import train_textual_inversion

    result = train_textual_inversion(cfg, resume=args.resume, overwrite=args.overwrite,
                                     progress=not args.no_progress)
    _print_result(result)
    print(f"Use it as embedding:{Path(cfg.output).stem} in a ComfyUI prompt (file in models/embeddings)")
    return 0


def cmd_costs(args: argparse.Namespace) -> int:
    # The keys every trainer writes into <output>.resources.json (trainer.loop.run_record), the table's columns.
    keys = {"artifact": str, "kind": str, "steps": (int, float), "train_seconds": (int, float),
            "peak_memory_mb": (int, float), "device": str}
    records = []
    for f in args.records:
        try:
            record = json.loads(Path(f).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: not a readable resource record ({e})") from e
        shape = ("a JSON object with the keys " + ", ".join(f"{k} ({'text' if t is str else 'number'})"
                                                            for k, t in keys.items()))
        if not isinstance(record, dict):
            raise ValueError(f"{f}: not a resource record: got a JSON {type(record).__name__}, expected {shape}, "
                             "as the trainers write to <output>.resources.json")
        wrong = [k for k, t in keys.items() if not isinstance(record.get(k), t) or isinstance(record.get(k), bool)]
        if wrong:
            raise ValueError(f"{f}: not a resource record: missing or mistyped {', '.join(wrong)}; expected {shape}, "
                             "as the trainers write to <output>.resources.json")
        records.append(record)
    from .core.resources import cost_table  # heavy: imports torch (peak-memory helpers)

    table = cost_table(records)
    print(table, end="")
    if args.out:
        atomic_write_text(args.out, "# Training cost\n\n" + table)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    cfg = build_config(EvalConfig, args)
    check_inputs(("eval", None), cfg)
    from .eval.report import PROBLEMS, evaluate  # heavy: torch and the feature networks

    report = evaluate(cfg, progress=not args.no_progress)
    markdown = (Path(cfg.out) / "report.md").read_text(encoding="utf-8").splitlines()
    print("\n".join(line for line in markdown if line.startswith("|")))
    for metric, reason in report["unavailable"].items():
        print(f"unavailable: {metric}: {reason}")
    # Why a cell shows n/a or a mean over fewer images than its method counts: the report's problem lines.
    if PROBLEMS in markdown:
        problems = markdown[markdown.index(PROBLEMS) + 2:]
        print("\n".join(line for line in problems[:problems.index("")] if line.startswith("- ")))
    print(f"Report written to {cfg.out} (report.md, report.json, report.csv, plots, grid.png)")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    if args.what == "stats":
        check_inputs(("prepare", "stats"), args)
        from .data.prepare import dataset_stats  # heavy: matplotlib for the statistics plots

        summary = dataset_stats(args.folders, args.out)
        print(f"{summary['images']} images; per style: {summary['per_style']}")
        if summary["skipped"]:
            print(f"Skipped {len(summary['skipped'])} file(s) (not counted):")
            for s in summary["skipped"]:
                print(f"  {s['file']}: {s['reason']}")
        print(f"Wrote {args.out}/summary.md, style_counts.png, size_hist.png, aspect_hist.png, sample_grid.png")
        return 0
    cfg = build_config(PrepareConfig, args)
    check_inputs(("prepare", args.what), cfg)
    from .data.prepare import prepare  # heavy: matplotlib for the statistics plots

    manifest = prepare(cfg, args.what, progress=not args.no_progress)
    print(f"Kept {manifest['count']} of {manifest['candidates']} candidate images in {cfg.out} "
          f"({len(manifest['skipped'])} skipped; see manifest.json)")
    return 0


def cmd_lora_info(args: argparse.Namespace) -> int:
    check_inputs(("lora", "info"), args)
    from .core.lora_file import describe  # heavy: imports torch

    for f in args.file:
        print(describe(f))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(bundled_workflows()))
        return 0
    cfg = build_config(RunConfig, args)
    check_inputs(("run", None), cfg)
    from .workflows.client import run_workflow  # heavy: the nodes package imports torch

    result = run_workflow(cfg, say=print)
    print(f"{len(result.done)} done, {len(result.skipped)} skipped (output existed), {len(result.failed)} failed")
    for photo, why in result.failed:
        print(f"  {photo}: {why}", file=sys.stderr)
    return 1 if result.failed else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    cfg = build_config(CalibrateConfig, args)
    check_inputs(("calibrate", None), cfg)
    from .study.calibrate import calibrate  # heavy: imports torch and the metrics

    cal = calibrate(cfg, say=print)
    print("SSIM by strength: " + ", ".join(f"{s:g}: {v:.4f}" for s, v in zip(cal.strengths, cal.ssim)))
    return 0


def cmd_adain(args: argparse.Namespace) -> int:
    cfg = build_config(AdaINConfig, args)
    check_inputs(("adain", None), cfg)
    from .baseline.adain import run_adain  # heavy: torch

    print(f"Wrote {run_adain(cfg)}")
    return 0


def error_line(e: BaseException, command: str) -> tuple[str, int]:
    """One line `<what, naming the input> (<what to do>)` and the exit code for an exception from a command."""
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower()):
        return f"out of memory ({text[:200]}); {MEMORY_HINTS.get(command, 'use smaller inputs')}", EXIT_RUNTIME
    if isinstance(e, OSError) and e.filename and not isinstance(e, (FileNotFoundError, FileExistsError)):
        what = {PermissionError: "permission denied", IsADirectoryError: "is a folder, not a file",
                NotADirectoryError: "is not a folder"}.get(type(e), e.strerror or type(e).__name__)
        return f"{e.filename}: {what} (check the path and its folder's permissions)", EXIT_RUNTIME
    if isinstance(e, (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)) and e.filename:
        return f"{e.filename}: {e.strerror or text}", EXIT_USAGE
    if isinstance(e, USAGE_ERRORS):
        return text, EXIT_USAGE
    if isinstance(e, (OSError, RuntimeError, FloatingPointError)):
        return text, EXIT_RUNTIME
    return (f"{type(e).__name__}: {text} (unexpected; rerun with --verbose or STYLORA_DEBUG=1 for the traceback)",
            EXIT_RUNTIME)


def cmd_study(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "what", "verbose", "config", "no_progress")}
    cfg = load_study_config(args.config, flags)
    check_study_inputs(cfg)
    # heavy: the study runner imports the trainers, torch and diffusers
    from .study.runner import run_study

    report = run_study(cfg, progress=not args.no_progress)
    markdown = (Path(cfg.out) / "report" / "report.md").read_text(encoding="utf-8")
    print("\n".join(line for line in markdown.splitlines() if line.startswith("|")))
    print(f"Report written to {cfg.out}/report (report.md, report.json, grids, sweeps); "
          f"{report['total_seconds']:.0f} s in all")
    return 0


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = make_parser()
    args = parser.parse_args(argv)
    debug = args.verbose or os.environ.get("STYLORA_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handlers = {("train", "lora"): cmd_train_lora, ("train", "dreambooth"): cmd_train_dreambooth,
                ("train", "textual-inversion"): cmd_train_textual_inversion,
                ("lora", "info"): cmd_lora_info, ("eval", None): cmd_eval, ("costs", None): cmd_costs,
                ("run", None): cmd_run, ("study", None): cmd_study, ("calibrate", None): cmd_calibrate,
                ("adain", None): cmd_adain,
                **{("prepare", what): cmd_prepare for what in ("wikiart", "coco", "stats")}}
    try:
        return handlers[(args.command, getattr(args, "what", None))](args)
    except KeyboardInterrupt:
        print("stylora: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure ends in one line; --verbose / STYLORA_DEBUG=1 show the traceback
        if debug:
            traceback.print_exc()
        message, code = error_line(e, args.command)
        print(f"stylora: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
