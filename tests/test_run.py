"""`stylora run` against a small stand-in for ComfyUI's HTTP API (the real server: tests/test_comfyui.py)."""

from __future__ import annotations

import email.parser
import io
import json
import struct
import threading
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import CORE_NODES, REPO, skimage_photos
from PIL import Image, ImageOps
from stylora.cli import main as cli_main
from stylora.workflows.client import (
    RunConfig,
    ServerError,
    ServerUnreachable,
    _error_text,
    load_workflow,
    run_workflow,
)
from stylora.workflows.graph import our_schema

# The templates' placeholder style is on this server too: runs that give no --style use it.
SHARED_OBJECT_INFO = REPO.parent / "shared" / "comfyui" / "object_info-0.3.64.json"
STYLES = ["None", "monet.safetensors", "ukiyo-e.safetensors", "my_style (stylora train lora).safetensors"]


def _object_info(without: tuple[str, ...] = ()) -> dict:
    """/object_info as the stand-in serves it: the core nodes' schema plus ours, with files on 'disk'."""
    info = {**json.loads(CORE_NODES.read_text()), **our_schema()}
    info["LoadStyleLoRA"]["input"]["required"]["style"] = [STYLES[1:], {}]
    for k in ("style_2", "style_3"):
        info["LoadStyleLoRA"]["input"]["optional"][k] = [STYLES, {}]
    ckpts = ["sd15.safetensors", "db.safetensors", "v1-5-pruned-emaonly.safetensors"]
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"] = [ckpts, {}]
    return {k: v for k, v in info.items() if k not in without}


class FakeComfy:
    """Answers /object_info, /upload/image, /prompt, /history, /queue and /view. 'Running' a prompt inverts the
    Content image; `fail_with` makes the sampler fail the way ComfyUI reports execution errors. `models`: a
    models folder whose styles/ and checkpoints/ files are listed too. `drop_after`: after that many prompts the
    server stops answering (drops every connection), as a killed ComfyUI does."""

    def __init__(self, without: tuple[str, ...] = (), fail_with: str | None = None, models: Path | None = None,
                 drop_after: int | None = None):
        self.object_info = _object_info(without)
        self.fail_with = fail_with
        self.models = models
        self.drop_after = drop_after
        self.uploads: dict[str, bytes] = {}
        self.prompts: list[dict] = []
        self.history: dict[str, dict] = {}
        self.polls: dict[str, int] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, kind: str = "application/json"):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if fake.dropped():
                    return
                url = urllib.parse.urlparse(self.path)
                if url.path == "/object_info":
                    return self._send(200, json.dumps(fake.info()).encode())
                if url.path == "/queue":
                    running = [[0, pid, {}, {}, []] for pid in fake.history if fake.polls.get(pid, 0) < 2]
                    return self._send(200, json.dumps({"queue_running": running, "queue_pending": []}).encode())
                if url.path.startswith("/history/"):
                    pid = url.path.split("/")[-1]
                    fake.polls[pid] = fake.polls.get(pid, 0) + 1
                    ready = fake.polls[pid] > 1  # the first poll finds it still running
                    return self._send(200, json.dumps({pid: fake.history[pid]} if ready else {}).encode())
                if url.path == "/view":
                    q = urllib.parse.parse_qs(url.query)
                    return self._send(200, fake.uploads["output/" + q["filename"][0]], "image/png")
                self._send(404, b"{}")

            def do_POST(self):
                if fake.dropped():
                    return
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/upload/image":
                    msg = email.parser.BytesParser().parsebytes(
                        b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
                    fields = {p.get_param("name", header="content-disposition"): p for p in msg.get_payload()}
                    part = fields["image"]
                    name = f"{fields['subfolder'].get_payload()}/{part.get_filename()}"
                    fake.uploads[name] = part.get_payload(decode=True)
                    reply = {"name": part.get_filename(), "subfolder": fields["subfolder"].get_payload(),
                             "type": "input"}
                    return self._send(200, json.dumps(reply).encode())
                if self.path == "/prompt":
                    return self._send(*fake.queue(json.loads(body)["prompt"]))
                self._send(404, b"{}")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def dropped(self) -> bool:
        return self.drop_after is not None and len(self.prompts) >= self.drop_after

    def info(self) -> dict:
        if self.models is None:
            return self.object_info
        info = json.loads(json.dumps(self.object_info))
        for folder, node, key in (("styles", "LoadStyleLoRA", "style"), ("checkpoints", "CheckpointLoaderSimple",
                                                                          "ckpt_name")):
            files = sorted(p.name for p in (self.models / folder).glob("*.safetensors"))
            info[node]["input"]["required"][key][0] += files
        return info

    def queue(self, prompt: dict) -> tuple[int, bytes]:
        unknown = [n["class_type"] for n in prompt.values() if n["class_type"] not in self.object_info]
        if unknown:
            err = {"error": {"type": "invalid_prompt", "message": f"Cannot execute because node {unknown[0]} does "
                                                                  "not exist.", "details": ""}, "node_errors": {}}
            return 400, json.dumps(err).encode()
        pid = f"p{len(self.prompts)}"
        self.prompts.append(prompt)
        if self.fail_with:
            self.history[pid] = {"outputs": {}, "status": {"status_str": "error", "completed": False, "messages": [
                ["execution_error", {"node_id": "8", "node_type": "KSampler", "exception_type": "RuntimeError",
                                     "exception_message": self.fail_with}]]}}
            return 200, json.dumps({"prompt_id": pid}).encode()
        content = next(n for n in prompt.values() if n["_meta"]["title"] == "Content")["inputs"]["image"]
        img = ImageOps.invert(Image.open(io.BytesIO(self.uploads[content])).convert("RGB"))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        self.uploads[f"output/{pid}.png"] = buf.getvalue()
        outputs = {}
        for node_id, node in prompt.items():
            if node["class_type"] == "SaveImage":
                outputs[node_id] = {"images": [{"filename": f"{pid}.png", "subfolder": "", "type": "output"}]}
            if node["class_type"] == "StyleMetrics":
                outputs[node_id] = {"text": ["ssim: 0.5"], "stylora_metrics": [{"metrics": {"ssim": 0.5}}]}
        self.history[pid] = {"outputs": outputs, "status": {"status_str": "success", "completed": True}}
        return 200, json.dumps({"prompt_id": pid, "number": 0}).encode()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def comfy():
    server = FakeComfy()
    yield server
    server.close()


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, arr in list(skimage_photos().items())[:3]:
        Image.fromarray(arr).convert("RGB").resize((64, 48)).save(folder / f"{name}.png")
    return folder


def test_single_photo_is_uploaded_substituted_run_and_downloaded(comfy, photos, tmp_path):
    photo = sorted(photos.iterdir())[0]
    out = tmp_path / "out.png"
    lines = []
    result = run_workflow(RunConfig(content=str(photo), out=str(out), server=comfy.url, style=("monet.safetensors",),
                                    strength=0.3, seed=7, checkpoint="sd15.safetensors",
                                    set=("Content encode.max_side=256",)), say=lines.append, poll=0.01)
    assert [d[0] for d in result.done] == [str(photo)] and not result.failed
    prompt = comfy.prompts[0]
    assert prompt["6"]["inputs"]["image"] == f"stylora/{photo.stem}.png"
    assert prompt["2"]["inputs"]["style"] == "monet.safetensors" and prompt["3"]["inputs"]["strength"] == 0.3
    assert prompt["8"]["inputs"]["seed"] == 7 and prompt["1"]["inputs"]["ckpt_name"] == "sd15.safetensors"
    assert prompt["7"]["inputs"]["max_side"] == 256
    expected = ImageOps.invert(Image.open(photo).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert any("running" in s for s in lines) and any("wrote" in s for s in lines)
    assert not any(comfy.url in s for s in lines)  # one server: the lines do not name it


def test_masked_blend_and_metrics_workflows(comfy, photos, tmp_path):
    photo = sorted(photos.iterdir())[0]
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 32, 48))
    mask.save(tmp_path / "mask.png")
    run_workflow(RunConfig(content=str(photo), out=str(tmp_path / "m.png"), server=comfy.url, workflow="masked_style",
                           mask=str(tmp_path / "mask.png")), poll=0.01)
    uploaded = Image.open(io.BytesIO(comfy.uploads[f"stylora/{photo.stem}.png"]))
    assert uploaded.mode == "RGBA"
    assert np.array_equal(np.asarray(uploaded)[..., 3], 255 - np.asarray(mask))  # LoadImage: MASK = 1 - alpha
    with pytest.raises(ValueError, match="pass --mask"):
        run_workflow(RunConfig(content=str(photo), out=str(tmp_path / "x.png"), server=comfy.url,
                               workflow="masked_style"))
    run_workflow(RunConfig(content=str(photo), out=str(tmp_path / "b.png"), server=comfy.url, workflow="style_blend",
                           style=("monet.safetensors", "ukiyo-e.safetensors:0.5")), poll=0.01)
    style = comfy.prompts[-1]["2"]["inputs"]
    assert (style["style"], style["style_2"], style["weight_2"]) == ("monet.safetensors", "ukiyo-e.safetensors", 0.5)
    run_workflow(RunConfig(content=str(photo), out=str(tmp_path / "b1.png"), server=comfy.url, workflow="style_blend",
                           style=("monet.safetensors", "ukiyo-e.safetensors")), poll=0.01)
    assert comfy.prompts[-1]["2"]["inputs"]["weight_2"] == 1.0 and comfy.prompts[-1]["2"]["inputs"]["strength"] == 1
    result = run_workflow(RunConfig(content=str(photo), out=str(tmp_path / "s.png"), server=comfy.url,
                                    workflow="style_metrics", style_image=str(photo)), poll=0.01)
    assert result.done[0][1] == [str(tmp_path / "s.png"), str(tmp_path / "s.metrics.json")]
    assert (tmp_path / "s.metrics.json").read_text() == '{\n "metrics": {\n  "ssim": 0.5\n }\n}'
    run_workflow(RunConfig(content=str(photo), out=str(tmp_path / "d.png"), server=comfy.url, workflow="dreambooth",
                           style=("db.safetensors",), strength=0.4), poll=0.01)
    assert comfy.prompts[-1]["1"]["inputs"]["ckpt_name"] == "db.safetensors"
    assert comfy.prompts[-1]["8"]["inputs"]["denoise"] == pytest.approx(0.3)


def test_batch_reports_bad_files_and_resumes(comfy, photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.open(photos / "coffee.png").save(photos / "coffee.jpg")  # same stem: both get an output
    Image.open(photos / "coffee.png").save(photos / ".hidden.png")  # not listed: hidden, a folder, not an image
    (photos / "album.png").mkdir()
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "styled"
    cfg = RunConfig(content=str(photos), out=str(out), server=comfy.url)
    first = run_workflow(cfg, poll=0.01)
    assert len(first.done) == 4 and [f[0] for f in first.failed] == [str(photos / "broken.jpg")]
    assert "broken.jpg" in first.failed[0][1]
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.png", "chelsea.png", "coffee_jpg.png",
                                                     "coffee_png.png"]
    second = run_workflow(cfg, poll=0.01)
    assert len(second.skipped) == 4 and not second.done and len(comfy.prompts) == 4


def test_clear_errors_for_server_node_style_and_execution_problems(photos, tmp_path, capsys):
    photo = str(sorted(photos.iterdir())[0])
    base = dict(content=photo, out=str(tmp_path / "o.png"))
    closed = FakeComfy()
    closed.close()
    with pytest.raises(ServerError, match="cannot reach it"):
        run_workflow(RunConfig(**base, server=closed.url))
    assert cli_main(["run", "--server", closed.url, "--content", photo, "--out", base["out"]]) == 1
    assert "stylora: error: server http://127.0.0.1" in capsys.readouterr().err
    no_pack = FakeComfy(without=("LoadStyleLoRA", "StyleStrength", "ContentEncode"))
    with pytest.raises(ServerError, match="ContentEncode, LoadStyleLoRA, StyleStrength not installed .*custom_nodes"):
        run_workflow(RunConfig(**base, server=no_pack.url))
    no_pack.close()
    comfy = FakeComfy()
    with pytest.raises(ServerError, match="style 'vangogh.safetensors' is not on the server .*available: monet"):
        run_workflow(RunConfig(**base, server=comfy.url, style=("vangogh.safetensors",)))
    with pytest.raises(ValueError, match="no bundled workflow 'nope'"):
        run_workflow(RunConfig(**base, server=comfy.url, workflow="nope"))
    with pytest.raises(ValueError, match="strength must be in 0..1"):
        run_workflow(RunConfig(**base, server=comfy.url, strength=2.0))
    comfy.close()
    failing = FakeComfy(fail_with="CUDA out of memory")
    result = run_workflow(RunConfig(**base, server=failing.url), poll=0.01)
    assert result.failed == [(photo, "node 8 (KSampler) failed: RuntimeError: CUDA out of memory")]
    failing.close()


def test_photos_are_spread_over_servers_and_a_server_that_drops_out_hands_its_work_over(photos, tmp_path):
    for p in sorted(photos.iterdir()):  # six photos, so two servers both get work
        Image.open(p).rotate(180).save(photos / f"{p.stem}_turned.png")
    base = dict(content=str(photos), style=("monet.safetensors",), strength=0.3, seed=7)

    def outputs(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    one = FakeComfy()
    run_workflow(RunConfig(**base, out=str(tmp_path / "one"), server=one.url), poll=0.01)
    a, b = FakeComfy(), FakeComfy()
    lines = []
    result = run_workflow(RunConfig(**base, out=str(tmp_path / "two"), server=(a.url, b.url)), say=lines.append,
                          poll=0.05)
    wrote = [s for s in lines if ": wrote " in s]
    assert len(wrote) == 6 and all(s.endswith((f" on {a.url}", f" on {b.url}")) for s in wrote)
    assert len(result.done) == 6 and a.prompts and b.prompts and len(a.prompts) + len(b.prompts) == 6
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
    assert {p["8"]["inputs"]["seed"] for p in a.prompts + b.prompts} == {7}  # the split does not change a seed
    dropping, steady = FakeComfy(drop_after=1), FakeComfy()  # its first photo is in flight when it goes
    result = run_workflow(RunConfig(**base, out=str(tmp_path / "dropped"), server=(dropping.url, steady.url)),
                          poll=0.05)
    assert len(result.done) == 6 and not result.failed and len(steady.prompts) >= 5
    # the photo in flight went back to the queue's end, yet the results are in the photos' order
    assert [d[0] for d in result.done] == [str(p) for p in sorted(photos.iterdir())]
    assert outputs(tmp_path / "dropped") == outputs(tmp_path / "one")
    alone = FakeComfy(drop_after=2)
    with pytest.raises(ServerError, match="cannot reach"):
        run_workflow(RunConfig(**base, out=str(tmp_path / "alone"), server=alone.url), poll=0.01)
    assert len(list((tmp_path / "alone").iterdir())) == 1  # finished outputs are kept
    c, d = FakeComfy(), FakeComfy()
    assert cli_main(["run", "--server", c.url, "--server", d.url, "--content", str(photos), "--out",
                     str(tmp_path / "cli")]) == 0
    assert len(c.prompts) + len(d.prompts) == 6
    for server in (one, a, b, dropping, steady, alone, c, d):
        server.close()


def test_a_flat_output_is_a_failure_not_a_silent_black_image(comfy, photos, tmp_path):
    """ComfyUI's Save Image writes NaN pixels as 0: an overflowed decode arrives as a black PNG. The fake server
    inverts its input, so a white photo comes back all black; a photo with one grey pixel does not."""
    white = np.full((48, 64, 3), 255, np.uint8)
    Image.fromarray(white).save(photos / "white.png")
    almost = white.copy()
    almost[3, 5] = 128
    Image.fromarray(almost).save(photos / "almost.png")
    lines = []
    result = run_workflow(RunConfig(content=str(photos), out=str(tmp_path / "out"), server=comfy.url), say=lines.append,
                          poll=0.01)
    assert [Path(f).name for f, _ in result.failed] == ["white.png"]
    assert "is one flat colour (0, 0, 0) (not written)" in result.failed[0][1] and "NaN" in result.failed[0][1]
    assert not (tmp_path / "out" / "white.png").exists() and (tmp_path / "out" / "almost.png").is_file()
    assert len(result.done) == 4 and any("white.png: FAILED" in s for s in lines)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (1-bit grey) and whose data is a few bytes: a decompression bomb's
    shape, cheap to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_failed_photo_makes_the_exit_status_non_zero_and_overwrite_redoes_outputs(comfy, photos, tmp_path, capsys):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    args = ["run", "--server", comfy.url, "--content", str(photos), "--out", str(out)]
    assert cli_main(args) == 1  # three written, one failed
    first = capsys.readouterr()
    assert "3 done, 0 skipped (output existed), 1 failed" in first.out and "broken.jpg" in first.err
    (out / "chelsea.png").write_bytes(b"an old output")
    assert cli_main(args) == 1  # the broken photo is tried again and fails again
    again = capsys.readouterr().out
    assert f"[3/4] chelsea.png: {out / 'chelsea.png'} exists, skipped (--overwrite redoes it)" in again
    assert "0 done, 3 skipped (output existed), 1 failed" in again and len(comfy.prompts) == 3
    assert (out / "chelsea.png").read_bytes() == b"an old output"
    (photos / "broken.jpg").unlink()
    assert cli_main([*args, "--overwrite"]) == 0
    assert "3 done, 0 skipped (output existed), 0 failed" in capsys.readouterr().out and len(comfy.prompts) == 6
    expected = ImageOps.invert(Image.open(photos / "chelsea.png").convert("RGB"))  # what the fake server makes
    assert np.array_equal(np.asarray(Image.open(out / "chelsea.png")), np.asarray(expected))


def test_a_bomb_sized_or_corrupt_mask_is_the_masks_error_before_anything_is_queued(comfy, photos, tmp_path, capsys):
    photo = str(sorted(photos.iterdir())[0])
    bomb, corrupt, truncated = tmp_path / "bomb.png", tmp_path / "corrupt.png", tmp_path / "truncated.png"
    bomb.write_bytes(_png_header_only(14_000, 14_000))  # 196 M pixels: over the 100 M limit and Pillow's own
    corrupt.write_bytes(b"not a picture at all" * 20)
    Image.new("L", (64, 48), 255).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    base = dict(content=photo, out=str(tmp_path / "o.png"), server=comfy.url, workflow="masked_style")
    for mask, why in ((bomb, "refused"), (corrupt, "not an image"), (truncated, "truncated or corrupt")):
        with pytest.raises(ValueError, match=f"^mask: {mask}: {why}"):
            run_workflow(RunConfig(**base, mask=str(mask)), poll=0.01)
    assert comfy.prompts == [] and comfy.uploads == {}  # nothing uploaded, nothing queued
    assert cli_main(["run", "--server", comfy.url, "--content", photo, "--out", base["out"], "--workflow",
                     "masked_style", "--mask", str(bomb)]) == 2
    assert "stylora: error: mask: " in capsys.readouterr().err and comfy.prompts == []


def test_a_mask_in_the_mask_editors_format_uses_its_alpha_and_16_bit_greys_keep_their_level(comfy, photos, tmp_path):
    """ComfyUI 0.3.64's Load Image gives MASK = 1 - alpha/255 (nodes.py LoadImage.load_image), and its mask editor
    saves the painted region as alpha 0: so a mask with transparency is read from its alpha, transparent = styled.
    The upload carries the mask the same way (alpha = 255 - mask)."""
    photo = sorted(photos.iterdir())[0]

    def uploaded_alpha(mask_path: Path) -> np.ndarray:
        run_workflow(RunConfig(content=str(photo), out=str(tmp_path / "o.png"), server=comfy.url,
                               workflow="masked_style", mask=str(mask_path), overwrite=True), poll=0.01)
        return np.asarray(Image.open(io.BytesIO(comfy.uploads[f"stylora/{photo.stem}.png"])))[..., 3]

    editor = np.full((48, 64, 4), 255, np.uint8)  # white, opaque: brightness would say "style everything"
    editor[:, :20, 3] = 0  # painted: the left 20 columns
    editor[:, 20:40, 3] = 200  # a soft stroke
    Image.fromarray(editor, "RGBA").save(tmp_path / "editor.png")
    expected = np.full((48, 64), 255, np.uint8)
    expected[:, :20], expected[:, 20:40] = 0, 200  # the editor's alpha itself
    assert np.array_equal(uploaded_alpha(tmp_path / "editor.png"), expected)
    grey16 = Image.fromarray(np.full((48, 64), 32768, np.uint16))  # 50% of 65535
    assert grey16.mode.startswith("I")
    grey16.save(tmp_path / "grey16.png")
    # 32768 / 65535 * 255 = 127.5 -> 128 (50%); the alpha is 255 - 128. Clipped to 8 bits it would be white (alpha 0).
    assert np.array_equal(uploaded_alpha(tmp_path / "grey16.png"), np.full((48, 64), 127, np.uint8))
    opaque = np.zeros((48, 64, 4), np.uint8)
    opaque[..., 3] = 255
    opaque[:, 32:, :3] = 255  # a black/white mask saved with an opaque alpha channel: its brightness counts
    Image.fromarray(opaque, "RGBA").save(tmp_path / "opaque.png")
    expected = np.full((48, 64), 255, np.uint8)
    expected[:, 32:] = 0
    assert np.array_equal(uploaded_alpha(tmp_path / "opaque.png"), expected)


BAD_VALUES = [  # (flags, what the message must say)
    ({"set": ("Sampler.stepz=30",)}, r"node 'Sampler' \(KSampler\) has no input 'stepz' \(ComfyUI would ignore it\); "
                                     r"its inputs: .*steps"),
    ({"set": ("Sampler.steps=abc",)}, r"node 'Sampler' \(KSampler\) input 'steps': 'abc' is not accepted; it takes "
                                      r"INT, a whole number in 1\.\.10000"),
    ({"set": ("Sampler.steps=12.5",)}, r"input 'steps': 12\.5 is not accepted; it takes INT"),
    ({"set": ("Sampler.steps=true",)}, r"input 'steps': True is not accepted"),
    ({"set": ("Strength.strength=7",)}, r"node 'Strength' \(StyleStrength\) input 'strength': 7 is not accepted; it "
                                        r"takes FLOAT, a finite number in 0\.0\.\.1\.0"),
    ({"set": ("Sampler.seed=-1",)}, r"input 'seed': -1 is not accepted; it takes INT, a whole number in 0\.\."),
    ({"set": ("Sampler.sampler_name=eulr",)}, r"input 'sampler_name': 'eulr' is not accepted; it takes one of euler, "),
    ({"set": ("Content encode.max_side=\"big\"",)}, r"node 'Content encode' \(ContentEncode\) input 'max_side'"),
    ({"set": ("Decode.samples=3",)}, r"node 'Decode' \(VAEDecode\) input 'samples': 3 is not accepted; it takes a "
                                     r"link from a LATENT output"),
    ({"style": ("monet.safetensors", "ukiyo-e.safetensors:nan")},
     r"node 'Style' \(LoadStyleLoRA\) input 'weight_2': nan is not accepted; it takes FLOAT, a finite number in "
     r"0\.0\.\.10\.0"),
    ({"style": ("monet.safetensors", "ukiyo-e.safetensors:-1")}, r"input 'weight_2': -1\.0 is not accepted"),
    ({"style": ("monet.safetensors:inf",)}, r"input 'strength': inf is not accepted"),
    ({"set": ("Sampler.steps",)}, r"set: 'Sampler\.steps' must be 'Node title\.input=value' with a title in the "
                                  r"workflow \(\[.*'Sampler'"),
    ({"set": ("Sampler=3",)}, r"set: 'Sampler=3' must be 'Node title\.input=value'"),
    ({"set": ("Nope.steps=3",)}, r"set: 'Nope\.steps=3' must be 'Node title\.input=value'"),
    ({"style": ("monet.safetensors",) * 4}, r"style: at most 3 styles per run, got 4"),
    ({"workflow": "dreambooth", "style": ("db.safetensors", "sd15.safetensors")},
     r"style: workflow dreambooth takes one checkpoint, got \['db\.safetensors', 'sd15\.safetensors'\]"),
    ({"style": ("monet.safetensors", "ukiyo-e.safetensors:abc")},
     r"style: the weight in 'ukiyo-e.safetensors:abc' is not a number; give NAME or NAME:WEIGHT"),
]


@pytest.mark.parametrize("flags,message", BAD_VALUES, ids=[str(f) for f, _ in BAD_VALUES])
def test_every_value_sent_is_checked_against_object_info_before_queueing(comfy, photos, flags, message, tmp_path):
    photo = str(sorted(photos.iterdir())[0])
    with pytest.raises(ValueError, match=message):
        run_workflow(RunConfig(content=photo, out=str(tmp_path / "o.png"), server=comfy.url, **flags), poll=0.01)
    assert comfy.prompts == [] and comfy.uploads == {}


def test_good_values_pass_the_check_and_are_sent(comfy, photos, tmp_path):
    photo = str(sorted(photos.iterdir())[0])
    run_workflow(RunConfig(content=photo, out=str(tmp_path / "o.png"), server=comfy.url, workflow="style_blend",
                           style=("monet.safetensors:-0.5", "ukiyo-e.safetensors:10"),
                           set=("Sampler.steps=1", "Sampler.cfg=100", "Sampler.seed=0", "Strength.strength=1",
                                "Sampler.sampler_name=dpmpp_2m", "Keep colours.amount=1", "Sampler.denoise=0.5")),
                 poll=0.01)
    sent = comfy.prompts[0]
    assert sent["8"]["inputs"]["steps"] == 1 and sent["8"]["inputs"]["cfg"] == 100
    assert sent["8"]["inputs"]["sampler_name"] == "dpmpp_2m" and sent["3"]["inputs"]["strength"] == 1
    assert sent["2"]["inputs"]["strength"] == -0.5 and sent["2"]["inputs"]["weight_2"] == 10.0
    assert sent["8"]["inputs"]["denoise"] == 0.5  # a linked input may be set to a value


def test_the_check_holds_against_comfyui_0364s_full_object_info():
    """The bundled workflows as shipped pass the check against the saved /object_info of ComfyUI 0.3.64 (all
    choices listed, where the offline fixture leaves file and image lists empty); a bad --set does not."""
    from stylora.workflows.client import check_values, substitute

    if not SHARED_OBJECT_INFO.is_file():
        pytest.skip(f"no {SHARED_OBJECT_INFO}")
    info = {**json.loads(SHARED_OBJECT_INFO.read_text()), **our_schema()}
    for path in sorted((REPO / "workflows" / "api").glob("*.json")):
        check_values(load_workflow(str(path)), info)
    graph = load_workflow("layout_guard")
    cfg = RunConfig(content="x.png", out="o.png", workflow="layout_guard",
                    set=("Edges.high_threshold=1.5", "Sampler.scheduler=karras"))
    with pytest.raises(ValueError, match=r"node 'Edges' \(Canny\) input 'high_threshold': 1\.5 is not accepted; it "
                                         r"takes FLOAT, a finite number in 0\.01\.\.0\.99"):
        check_values(substitute(graph, cfg, "x.png", None), info)
    untitled = substitute(graph, cfg, "x.png", None)
    del untitled["30"]["_meta"]  # an exported workflow without titles: the node is named by its id
    with pytest.raises(ValueError, match=r"node '30' \(Canny\) input 'high_threshold'"):
        check_values(untitled, info)


def test_an_error_message_that_mentions_reaching_is_a_failure_not_a_lost_server(photos, tmp_path):
    """A server is dropped for a ServerUnreachable (no answer), never for an error whose text looks like one."""
    photo = str(sorted(photos.iterdir())[0])
    closed = FakeComfy()
    closed.close()
    with pytest.raises(ServerUnreachable):
        run_workflow(RunConfig(content=photo, out=str(tmp_path / "c.png"), server=closed.url))
    failing = FakeComfy(fail_with="cannot reach it (the model)")
    result = run_workflow(RunConfig(content=photo, out=str(tmp_path / "o.png"), server=failing.url), poll=0.01)
    assert result.failed == [(photo, "node 8 (KSampler) failed: RuntimeError: cannot reach it (the model)")]
    assert len(failing.prompts) == 1
    failing.close()


def test_value_check_rules():
    """The rules one by one, on specs as /object_info gives them."""
    from stylora.workflows.client import _value_fits

    assert _value_fits("FLOAT", {}, 3) and _value_fits("FLOAT", {"min": 0.0, "max": 1.0}, 1.0)
    assert not _value_fits("FLOAT", {}, float("inf")) and not _value_fits("FLOAT", {}, float("nan"))
    assert not _value_fits("FLOAT", {"min": 0.0, "max": 1.0}, 1.0001) and not _value_fits("FLOAT", {"min": 0.0}, -1e-9)
    assert _value_fits("INT", {"min": 1, "max": 3}, 3) and not _value_fits("INT", {"min": 1, "max": 3}, 4)
    assert not _value_fits("INT", {}, 2.0) and not _value_fits("INT", {}, True) and not _value_fits("INT", {}, "2")
    assert _value_fits("BOOLEAN", {}, False) and not _value_fits("BOOLEAN", {}, 0)
    assert _value_fits("STRING", {}, "") and not _value_fits("STRING", {}, 1)
    assert _value_fits(["a", "b"], {}, "b") and not _value_fits(["a", "b"], {}, "c") and _value_fits([], {}, "c")
    assert _value_fits("COMBO", {"options": ["x"]}, "x") and not _value_fits("COMBO", {"options": ["x"]}, "y")
    assert not _value_fits("LATENT", {}, 3)


def test_run_config_refuses_bad_flags_when_made(tmp_path):
    """Checked when the config is made, before any server or file is touched; each message names the flag."""
    base = dict(content="photo.png", out="out.png")
    cases = [(dict(server=()), "server: give at least one ComfyUI server URL"),
             (dict(server=("",)), "server: give at least one ComfyUI server URL, got"),
             (dict(server="http://127.0.0.1:notaport"), "--server 'http://127.0.0.1:notaport': not a valid URL"),
             (dict(server=("http://127.0.0.1:8188", "ftp://host")), "--server 'ftp://host': not an http"),
             (dict(strength=1.01), "strength must be in 0..1, got 1.01"),
             (dict(strength=float("nan")), "strength must be in 0..1"),
             (dict(keep_colours=1.5), "keep_colours must be in 0..1, got 1.5"),
             (dict(keep_colours=-0.1), "keep_colours must be in 0..1"),
             (dict(timeout=0.0), "timeout must be a finite number of seconds > 0"),
             (dict(seed=-1), "seed must be >= 0, got -1")]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
            RunConfig(**base, **flags)
    edge = RunConfig(**base, strength=1.0, keep_colours=1.0, seed=0, timeout=0.5, server="127.0.0.1:8188")
    assert (edge.strength, edge.keep_colours, edge.seed, edge.server) == (1.0, 1.0, 0, ("127.0.0.1:8188",))
    assert RunConfig(**base).timeout == 3600.0  # an hour per image: a CPU server at 512 px takes minutes
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not a readable JSON file"):
        load_workflow(str(tmp_path / "broken.json"))


def test_comfyuis_error_json_becomes_one_readable_line():
    body = json.dumps({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed",
                                 "details": "see node errors"},
                       "node_errors": {"8": {"class_type": "KSampler", "errors": [
                           {"message": "Value bigger than max", "details": "steps: 20000 > 10000"}]}}})
    assert _error_text(body) == ("Prompt outputs failed: see node errors; node 8 (KSampler): Value bigger than max: "
                                 "steps: 20000 > 10000")
    assert _error_text(json.dumps({"error": {"message": "Bad"}})) == "Bad"
    assert _error_text("<html>502 Bad Gateway</html>") == "<html>502 Bad Gateway</html>"


def test_bare_specs_and_long_choice_lists_in_the_value_check():
    from stylora.workflows.client import _accepted, check_values

    info = {"T": {"input": {"required": {"n": ["INT"], "c": [[f"c{i}" for i in range(21)]]}}}}
    check_values({"1": {"class_type": "T", "inputs": {"n": -5, "c": "c20"}}}, info)  # no options: any whole number
    with pytest.raises(ValueError, match=r"node '1' \(T\) input 'n': 'x' is not accepted; it takes INT, a whole "
                                         r"number in -inf\.\.inf"):
        check_values({"1": {"class_type": "T", "inputs": {"n": "x"}}}, info)
    twenty = [f"c{i}" for i in range(20)]
    assert _accepted(twenty, {}) == "one of " + ", ".join(twenty)
    assert _accepted([*twenty, "c20"], {}) == "one of " + ", ".join(twenty) + ", ..."


class _QueueStub:
    """A server whose prompt waits behind two others, then runs, then is done."""

    def __init__(self):
        self.calls = 0

    def get_json(self, path: str) -> dict:
        if path.startswith("/history/"):
            self.calls += 1
            return {"mine": {"status": {"completed": True}, "outputs": {}}} if self.calls > 2 else {}
        pending = [[1, "a"], [2, "b"], [3, "mine"]] if self.calls == 1 else []
        return {"queue_running": [[0, "mine"]] if self.calls == 2 else [], "queue_pending": pending}


def test_waiting_says_how_many_prompts_are_ahead_then_running():
    from stylora.workflows.client import _wait

    states = []
    assert _wait(_QueueStub(), "mine", 10, 0.0, states.append) == {"status": {"completed": True}, "outputs": {}}
    assert states == ["queued (2 ahead)", "running"]
