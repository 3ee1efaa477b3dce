"""Integration tests against a real ComfyUI (skipped unless COMFYUI_PATH points at a checkout).

    scripts/comfyui_setup.sh --test 0.29.0 0.3.64

sets up each ComfyUI snapshot from ../shared/comfyui with its own environment (the pack is not
installed there: it is a plain clone in `custom_nodes/`) and runs this file with that ComfyUI's
python, which is how these tests are meant to run (the in-process tests import ComfyUI). Another
ComfyUI: `COMFYUI_PATH=… COMFYUI_PYTHON=… python -m pytest -m comfyui tests/test_comfyui_integration.py`
from an interpreter that can import it; one that cannot fails with a message saying so.

Two kinds, both described in docs/comfyui.md ("Integration tests"):

- server tests: ComfyUI is started on loopback with this repository linked into a temporary
  `custom_nodes/qvgen` (the folder name the registry gives, the same as the library's) beside
  `tests/comfy_test_pack`, and tiny Wan checkpoints and a random-weight Wan VAE made here in its
  `models/`. They check that the pack loads without import failures, that `/object_info` lists the
  nodes, and run API-format prompts through the loader / quantize node, `ModelSamplingSD3`, a LoRA
  loader, `KSampler`, `VAEDecode` and `SaveAnimatedWEBP`; broken files fail their prompt with a
  message naming the problem while the server keeps serving. ComfyUI runs in `COMFYUI_PYTHON`
  (default: this interpreter).
- in-process tests (ComfyUI imported here): the model ComfyUI builds with QVGen's layers against
  the diffusers reference, LoRA patching and `--lowvram`-style offload.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
START_TIMEOUT = float(os.environ.get("COMFYUI_START_TIMEOUT", "180"))
PACK_FOLDER = "qvgen"


pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(
        not COMFYUI_PATH,
        reason="COMFYUI_PATH is not set: scripts/comfyui_setup.sh --test VERSION sets up a ComfyUI "
        "snapshot from ../shared/comfyui and runs these tests",
    ),
]

if COMFYUI_PATH:  # ComfyUI's environment may carry a torchvision that needs the launcher's workaround
    _spec = importlib.util.spec_from_file_location("comfyui_launch", REPO / "scripts" / "comfyui_launch.py")
    _launch = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_launch)
    _launch._torchvision_workaround()

QVGEN_FILE = "qvgen_tiny_w4a4.safetensors"
FP_FILE = "wan_tiny_fp.safetensors"
HUB_REPO = "qvgen-test/tiny-wan-w4a4"
LORA_FILE = "qvgen_tiny_lora.safetensors"
VAE_FILE = "wan_tiny_random_vae.safetensors"
BROKEN_FILE = "qvgen_tiny_missing_tensor.safetensors"


def import_qvgen_nodes():
    """`qvgen_nodes` from this checkout (it is the node pack, not an installed package), and `qvgen`
    through it."""
    if "qvgen_nodes" in sys.modules:
        return sys.modules["qvgen_nodes"]
    folder = REPO / "qvgen_nodes"
    spec = importlib.util.spec_from_file_location(
        "qvgen_nodes", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["qvgen_nodes"] = module
    spec.loader.exec_module(module)
    module.ensure_qvgen()  # the library as the pack gets it (ComfyUI's environment does not install qvgen)
    return module


# ---- tiny models ------------------------------------------------------------------------------
def tiny_wan(seed: int = 0):
    """The smallest diffusers Wan 2.1 T2V that ComfyUI's detection accepts (dim 128 = 1 head × 128,
    text_dim 4096, 16 latent channels, patch (1, 2, 2))."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=1,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=256,
        num_layers=2,
    )


def make_qvgen_checkpoint(path: Path, *, n_buckets: int = 4, transform: str = "none", rank: int = 0) -> Path:
    from qvgen import QVGenConfig, convert_model, save_quantized
    from qvgen.layers import QVGenLinear

    model = tiny_wan()
    cfg = QVGenConfig(rank=rank, n_buckets=n_buckets, input_transform=transform)
    convert_model(model, cfg, progress=False)
    with torch.no_grad():  # distinct clipping factors per bucket, so a wrong bucket shows
        for m in model.modules():
            if isinstance(m, QVGenLinear):
                m.act_quantizer.clip_logits.copy_(torch.linspace(0.5, 4.0, n_buckets)[:, None].repeat(1, 2))
    return save_quantized(model, cfg, path, dtype=torch.float32)


def make_fp_checkpoint(path: Path) -> Path:
    """The same tiny model in full precision, under ComfyUI's names (what UNETLoader reads)."""
    from safetensors.torch import save_file

    from qvgen.adapters.comfy.names import to_comfy_state_dict

    sd = {k: v.contiguous() for k, v in to_comfy_state_dict(tiny_wan().state_dict()).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def make_lora(path: Path, rank: int = 4) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on every self-attention q/k/v/o of the tiny model (ComfyUI's generic LoRA keys)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    sd = {}
    for b in range(2):
        for p in ("q", "k", "v", "o"):
            key = f"diffusion_model.blocks.{b}.self_attn.{p}"
            sd[f"{key}.lora_up.weight"] = torch.randn(128, rank, generator=g) * 0.05
            sd[f"{key}.lora_down.weight"] = torch.randn(rank, 128, generator=g) * 0.05
            sd[f"{key}.alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return sd


def make_wan_vae(path: Path) -> Path:
    """A Wan 2.1 VAE with random weights, built with ComfyUI's own class (its architecture is fixed:
    about 127 M parameters, 250 MB in fp16); enough to run `VAEDecode` and save a video."""
    _import_comfy()
    from comfy.ldm.wan.vae import WanVAE
    from safetensors.torch import save_file

    vae = WanVAE(
        dim=96,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # ComfyUI's layers skip initialisation: set every parameter
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):  # RMS norms
                p.fill_(1.0)
            elif p.ndim > 1:  # convolutions: unit variance through each layer
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.zero_()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float16).contiguous() for k, v in vae.state_dict().items()}, str(path))
    return path


def first_packed_key(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return next(k for k in sorted(f.keys()) if k.endswith(".qweight"))


def make_broken_checkpoint(good: Path, path: Path) -> Path:
    """A copy of a QVGen checkpoint whose first packed weight (`first_packed_key`) lost a column: the
    header and the config are intact, so the loader lists it and fails only when it builds the model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    broken = first_packed_key(good)
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors[broken] = tensors[broken][:, :-1].contiguous()
        save_file(tensors, str(path), metadata=f.metadata())
    return path


# ---- a ComfyUI server -------------------------------------------------------------------------
class Server:
    def __init__(self, base: Path, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.base, self.port, self.proc, self.log = base, port, proc, log
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """Queue an API-format prompt and wait for its history entry."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "qvgen-tests"})
        assert status == 200, f"prompt rejected ({status}): {json.dumps(body)[:2000]}"
        pid = body["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                if hist[pid]["status"].get("status_str") in ("success", "error"):
                    return hist[pid]
            time.sleep(0.2)
        raise AssertionError(f"prompt {pid} did not finish in {timeout}s; log tail:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfy_home(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("comfyui_home")
    nodes = base / "custom_nodes"
    nodes.mkdir()
    (nodes / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    (nodes / "qvgen_test_pack").symlink_to(REPO / "tests" / "comfy_test_pack", target_is_directory=True)
    dm = base / "models" / "diffusion_models"
    make_qvgen_checkpoint(dm / QVGEN_FILE)
    make_broken_checkpoint(dm / QVGEN_FILE, dm / BROKEN_FILE)
    make_fp_checkpoint(dm / FP_FILE)
    make_lora(base / "models" / "loras" / LORA_FILE)
    make_wan_vae(base / "models" / "vae" / VAE_FILE)
    # What an earlier online run of the loader's repo_id download leaves behind.
    hub_copy = dm / "qvgen" / HUB_REPO.replace("/", "--") / "comfyui" / "tiny.safetensors"
    make_qvgen_checkpoint(hub_copy, n_buckets=1)
    return base


@pytest.fixture(scope="module")
def server(comfy_home):
    port = _free_port()
    log = comfy_home / "comfyui.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        COMFYUI_PYTHON,
        str(REPO / "scripts" / "comfyui_launch.py"),
        COMFYUI_PATH,
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(comfy_home),
        "--disable-auto-launch",
    ]
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    srv = Server(comfy_home, port, proc, log)
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"ComfyUI ({COMFYUI_PATH}) exited with {proc.returncode} under {COMFYUI_PYTHON}; set "
                    "COMFYUI_PYTHON to ComfyUI's own python (scripts/comfyui_setup.sh makes one). Log:\n"
                    + srv.log_tail()
                )
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() - t0 > START_TIMEOUT:
                    raise AssertionError(f"ComfyUI did not answer within {START_TIMEOUT}s:\n{srv.log_tail()}") from None
                time.sleep(0.5)
        srv.startup_s = time.monotonic() - t0
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _latent_graph(model_node: dict, prefix: str, seed: int = 0, extra: dict | None = None) -> dict:
    """model → ModelSamplingSD3 → KSampler (4 steps, uni_pc) with test conditioning → SaveLatent."""
    g = {
        "m": model_node,
        "ms": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["m", 0], "shift": 8.0}},
        "pos": {"class_type": "QVGenTestConditioning", "inputs": {"seed": 1, "tokens": 8, "scale": 0.1}},
        "neg": {"class_type": "QVGenTestConditioning", "inputs": {"seed": 2, "tokens": 8, "scale": 0.1}},
        "lat": {
            "class_type": "EmptyHunyuanLatentVideo",
            "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1},
        },
        "ks": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["ms", 0],
                "positive": ["pos", 0],
                "negative": ["neg", 0],
                "latent_image": ["lat", 0],
                "seed": seed,
                "steps": 4,
                "cfg": 5.0,
                "sampler_name": "uni_pc",
                "scheduler": "simple",
                "denoise": 1.0,
            },
        },
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["ks", 0], "filename_prefix": prefix}},
    }
    g.update(extra or {})
    return g


def _saved_latent(server: Server, entry: dict, node: str = "save") -> torch.Tensor:
    from safetensors.torch import load_file

    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    item = entry["outputs"][node]["latents"][0]
    path = server.base / "output" / item["subfolder"] / item["filename"]
    return load_file(str(path))["latent_tensor"]


# ---- server tests -----------------------------------------------------------------------------
def test_pack_loads_and_object_info_lists_the_nodes(server):
    info = server.get("/object_info")
    for node_id in ("QVGenLoader", "QVGenQuantize", "QVGenTestConditioning"):
        assert node_id in info, f"{node_id} missing from /object_info; log:\n{server.log_tail()}"
    loader = info["QVGenLoader"]
    assert loader["category"] == "QVGen" and loader["output"] == ["MODEL"] and loader["description"]
    options = loader["input"]["required"]["checkpoint"]
    names = options[1]["options"] if isinstance(options[0], str) else options[0]
    assert QVGEN_FILE in names, names
    assert FP_FILE not in names  # only QVGen checkpoints are offered
    assert any(n.startswith("qvgen") and n.endswith("tiny.safetensors") for n in names)
    assert set(loader["input"]["optional"]) == {"repo_id", "revision", "backend", "compute_dtype"}
    assert info["QVGenQuantize"]["input"]["required"]["model"][0] == "MODEL"
    log = server.log.read_text(errors="replace").splitlines()
    ours = [line for line in log if f"custom_nodes/{PACK_FOLDER}" in line or "qvgen_test_pack" in line]
    assert not [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line], ours
    print(f"ComfyUI answered after {server.startup_s:.1f}s; pack import: {[line.strip() for line in ours]}")


def test_loader_graph_runs_to_a_saved_video(server):
    """The shipped workflow's chain: loader → ModelSamplingSD3 → KSampler → VAEDecode → SaveAnimatedWEBP."""
    from PIL import Image

    video = {
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["vae", 0]}},
        "webp": {
            "class_type": "SaveAnimatedWEBP",
            "inputs": {
                "images": ["dec", 0],
                "filename_prefix": "qvgen/w4a4",
                "fps": 16.0,
                "lossless": False,
                "quality": 80,
                "method": "fastest",
            },
        },
    }
    t0 = time.monotonic()
    node = {"class_type": "QVGenLoader", "inputs": {"checkpoint": QVGEN_FILE}}
    entry = server.run(_latent_graph(node, "qvgen/w4a4", extra=video))
    latent = _saved_latent(server, entry)
    assert latent.shape == (1, 16, 2, 8, 8) and torch.isfinite(latent).all()
    item = entry["outputs"]["webp"]["images"][0]
    with Image.open(server.base / "output" / item["subfolder"] / item["filename"]) as webp:
        assert webp.format == "WEBP" and webp.size == (64, 64)
        assert webp.n_frames == 5  # 2 latent frames → 5 (distinct: the random VAE's frames differ)
    print(f"QVGenLoader → KSampler (4 steps) → VAEDecode → SaveAnimatedWEBP: {time.monotonic() - t0:.2f}s")


def test_a_broken_checkpoint_fails_its_prompt_and_the_server_keeps_serving(server):
    from qvgen.adapters.comfy.names import diffusers_to_comfy

    broken = first_packed_key(server.base / "models" / "diffusion_models" / QVGEN_FILE).removesuffix(".qweight")
    entry = server.run(_latent_graph({"class_type": "QVGenLoader", "inputs": {"checkpoint": BROKEN_FILE}}, "qvgen/bad"))
    assert entry["status"]["status_str"] == "error"
    text = json.dumps(entry["status"]["messages"])
    assert BROKEN_FILE in text and diffusers_to_comfy(broken) in text, text[:2000]
    assert server.get("/system_stats")["system"]
    good = server.run(_latent_graph({"class_type": "QVGenLoader", "inputs": {"checkpoint": QVGEN_FILE}}, "qvgen/ok"))
    assert torch.isfinite(_saved_latent(server, good)).all()


def test_quantize_node_beside_full_precision_with_lora(server):
    fp = {"class_type": "UNETLoader", "inputs": {"unet_name": FP_FILE, "weight_dtype": "default"}}
    graph = _latent_graph(fp, "qvgen/fp")
    quant = {
        "q": {"class_type": "QVGenQuantize", "inputs": {"model": ["m", 0], "weight_bits": "4", "act_bits": "4"}},
        "lora": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["q", 0], "lora_name": LORA_FILE, "strength_model": 1.0},
        },
        "ms_q": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["lora", 0], "shift": 8.0}},
        "ks_q": {"class_type": "KSampler", "inputs": {**graph["ks"]["inputs"], "model": ["ms_q", 0]}},
        "save_q": {"class_type": "SaveLatent", "inputs": {"samples": ["ks_q", 0], "filename_prefix": "qvgen/rtn"}},
    }
    entry = server.run({**graph, **quant})
    a, b = _saved_latent(server, entry, "save"), _saved_latent(server, entry, "save_q")
    assert torch.isfinite(b).all() and a.shape == b.shape
    rel = float((a - b).norm() / a.norm())
    assert 0.0 < rel < 1.0, rel  # the quantized + LoRA branch differs from, but tracks, full precision
    log = server.log.read_text(errors="replace")
    assert "NOT LOADED" not in log, "LoRA keys were not matched to the quantized layers"

    # the full-precision branch alone, run again, is unaffected by the quantized clone
    again = _saved_latent(server, server.run(_latent_graph(fp, "qvgen/fp_again")))
    assert torch.equal(a, again)


def test_repo_id_offline_uses_the_earlier_download(server):
    node = {"class_type": "QVGenLoader", "inputs": {"checkpoint": "none (use repo_id)", "repo_id": HUB_REPO}}
    latent = _saved_latent(server, server.run(_latent_graph(node, "qvgen/hub")))
    assert torch.isfinite(latent).all()


def test_loader_errors_name_the_problem(server):
    node = {"class_type": "QVGenLoader", "inputs": {"checkpoint": "none (use repo_id)", "repo_id": "nobody/missing"}}
    entry = server.run(_latent_graph(node, "qvgen/err"))
    assert entry["status"]["status_str"] == "error"
    text = json.dumps(entry["status"]["messages"])
    assert "not downloaded yet" in text and "HF_HUB_OFFLINE" in text, text[:2000]


def test_committed_workflows_match_this_comfyui(server):
    nodes = import_qvgen_nodes()
    from importlib import import_module

    check = import_module("qvgen_nodes.workflow_check")
    info = server.get("/object_info")
    for path in sorted((REPO / "workflows").glob("*.json")):
        errors = check.check_workflow(json.loads(path.read_text()), check.defs_from_object_info(info))
        assert not errors, f"{path.name}: {errors}"
    assert nodes


# ---- in-process tests (ComfyUI importable here) -----------------------------------------------
def _import_comfy():
    if str(Path(COMFYUI_PATH).resolve()) not in sys.path:
        sys.path.insert(0, str(Path(COMFYUI_PATH).resolve()))
    try:
        import comfy.cli_args

        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True
        import comfy.model_management  # noqa: F401
        import comfy.sd
    except ImportError as e:
        pytest.fail(
            f"ComfyUI at {COMFYUI_PATH} cannot be imported by {sys.executable} ({e}): run these tests with "
            "ComfyUI's own python (scripts/comfyui_setup.sh --test VERSION does)"
        )
    return comfy


@pytest.fixture(scope="module")
def comfy():
    return _import_comfy()


@pytest.mark.parametrize("transform,rank", [("none", 0), ("hadamard", 4)])
def test_comfyui_model_matches_the_diffusers_reference(comfy, tmp_path, transform, rank):
    from qvgen import load_quantized_model

    nodes = import_qvgen_nodes()
    from qvgen_nodes import loader

    path = make_qvgen_checkpoint(tmp_path / "m.safetensors", transform=transform, rank=rank)
    ref = load_quantized_model(path, dtype=torch.float32)
    loaded = loader.load_model(path, compute_dtype="fp32")
    dm = loaded.patcher.model.diffusion_model
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, 3, 8, 8, generator=g), torch.randn(2, 7, 4096, generator=g)
    for t in ([900.0, 900.0], [100.0, 700.0]):  # one bucket for the batch; one per sample
        with torch.no_grad():
            a = ref(x, torch.tensor(t), ctx, return_dict=False)[0]
            b = dm(x, torch.tensor(t), ctx)
        assert (a - b).abs().max() <= 1e-5 * a.abs().max(), t
    assert nodes


def test_lora_patches_quantized_layers_and_unpatches(comfy, tmp_path):
    import comfy.sd
    import comfy.utils

    import_qvgen_nodes()
    from qvgen_nodes import loader

    path = make_qvgen_checkpoint(tmp_path / "m.safetensors")
    lora = make_lora(tmp_path / "l.safetensors")
    patcher = loader.load_model(path, compute_dtype="fp32").patcher
    dm = patcher.model.diffusion_model
    g = torch.Generator().manual_seed(3)
    x, ctx, t = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 7, 4096, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        base = dm(x, t, ctx)
    patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 0.5, 0.0)

    patched.patch_model()
    layer = dm.blocks[0].self_attn.q
    expected = (
        0.5
        * lora["diffusion_model.blocks.0.self_attn.q.lora_up.weight"]
        @ (lora["diffusion_model.blocks.0.self_attn.q.lora_down.weight"])
    )
    from qvgen_nodes.ops import decode_delta

    delta = decode_delta(layer.weight.float(), 128, 128)
    assert delta is not None and torch.allclose(delta, expected, atol=1e-5)
    assert layer.weight.shape == (4, 256)  # kept as rank-4 factors, not a dense matrix
    with torch.no_grad():
        full = dm(x, t, ctx)
    assert (full - base).abs().max() > 1e-4
    patched.unpatch_model()
    assert layer.weight.numel() == 0
    with torch.no_grad():
        assert torch.equal(dm(x, t, ctx), base)

    # --lowvram: modules left on the offload side get the patch through ComfyUI's LowVramPatch
    patched.patch_model(lowvram_model_memory=1)
    assert any(getattr(m, "weight_function", None) for m in dm.modules())
    with torch.no_grad():
        low = dm(x, t, ctx)
        low2 = dm(x, t, ctx)
    patched.unpatch_model()
    assert torch.allclose(low, full, atol=1e-5) and torch.equal(low, low2)


# ---- ComfyUI's native NVFP4 layers, through the stock loader ------------------------------------------
def make_nvfp4_file(path: Path) -> Path:
    """The tiny Wan trained-for-NVFP4 (scheme nvfp4, learned-looking clips), exported in ComfyUI's format."""
    from qvgen import QVGenConfig, convert_model, export_comfy
    from qvgen.layers import QVGenLinear

    model, cfg = tiny_wan(), QVGenConfig(scheme="nvfp4", rank=0)
    convert_model(model, cfg, progress=False)
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 16, 3, 8, 8, generator=g), torch.randn(2, 7, 4096, generator=g)
    with torch.no_grad():
        model(x, torch.tensor([300.0, 800.0]), ctx)  # calibrates every layer's input scale
        for m in model.modules():
            if isinstance(m, QVGenLinear):
                m.weight_quantizer.block_clip.uniform_(0.7, 1.0, generator=g)
                m.act_quantizer.clip.fill_(0.6)
    return export_comfy(model, cfg, path, dtype=torch.float32).path


def _nvfp4_in_comfyui(comfy, path: Path):
    import comfy.sd
    from comfy.quant_ops import QuantizedTensor

    patcher = comfy.sd.load_diffusion_model(str(path))
    dm = patcher.model.diffusion_model
    linears = {n: m for n, m in dm.named_modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "quant_format")}
    layouts = {n: getattr(m, "layout_type", None) for n, m in linears.items()}
    quantized = {n for n, m in linears.items() if isinstance(m.weight, QuantizedTensor)}
    return patcher, dm, layouts, quantized


def test_nvfp4_file_loads_as_comfyuis_nvfp4_layers_and_matches_the_loader(comfy, tmp_path, monkeypatch):
    """ComfyUI 0.29's stock loader (`comfy.sd.load_diffusion_model`, what "Load Diffusion Model" calls)
    turns every layer the file marks into its NVFP4 layer. Two forwards against `load_comfy_native`:

    - as ComfyUI runs it here (no FP4 tensor cores: nvfp4 is an "emulated op", the weight is
      dequantized and the input is not quantized) vs the loader with `quantize_input=False`;
    - as on an FP4 GPU (nvfp4 enabled: the input quantized by ComfyUI with the file's `input_scale`),
      vs the default loader. The FP4 GEMM cannot run on a CPU: the layers (all with a bias) go through
      comfy-kitchen's dequantizing fallback, and its FP4 kernel is made to fail the way it falls back
      from, should a version route them there.

    Same weights, scales and codes on both sides; only the two Wan implementations' float operation
    order differs. Without input quantization that bounds the gap by 1e-5 of max |y| (as the QVGen
    loader's ComfyUI test); with it, a ~1e-7 difference in a layer's input can flip one e2m1 rounding,
    so the check is the one used for packed-vs-fake-quant models (median |Δ| ≤ 1e-5, relative L2 ≤ 2e-3).
    """
    try:
        from comfy.quant_ops import QUANT_ALGOS
    except ImportError:
        QUANT_ALGOS = {}
    if "nvfp4" not in QUANT_ALGOS:
        pytest.skip("this ComfyUI has no native nvfp4 layers (comfy/quant_ops.py QUANT_ALGOS; ComfyUI 0.29 has them)")
    import comfy_kitchen as ck

    from qvgen.adapters.comfy.native import load_comfy_native, read_comfy_native

    import_qvgen_nodes()
    path = make_nvfp4_file(tmp_path / "wan_nvfp4.safetensors")
    marked = set(read_comfy_native(path).layers)
    patcher, dm, layouts, quantized = _nvfp4_in_comfyui(comfy, path)
    assert quantized == marked and len(marked) == 26
    assert {layouts[n] for n in marked} == {"TensorCoreNVFP4Layout"}
    assert all(dm.get_submodule(n).weight.dtype == torch.float32 for n in marked)  # the compute dtype here
    g = torch.Generator().manual_seed(1)
    x, ctx, t = (
        torch.randn(2, 16, 3, 8, 8, generator=g),
        torch.randn(2, 7, 4096, generator=g),
        torch.tensor([900.0, 200.0]),
    )

    ref = load_comfy_native(path, quantize_input=False)
    with torch.no_grad():
        a, b = ref(x, t, ctx, return_dict=False)[0], dm(x, t, ctx)
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()

    import comfy.quant_ops

    layout = comfy.quant_ops.TensorCoreNVFP4Layout
    quantize, quantized_inputs = layout.quantize.__func__, []

    def counting_quantize(cls, tensor, scale=None, **kwargs):
        quantized_inputs.append(scale)
        return quantize(cls, tensor, scale=scale, **kwargs)

    def no_fp4_gemm(*args, **kwargs):  # what comfy-kitchen does when its FP4 kernel fails: dequantize
        raise RuntimeError("no FP4 tensor cores on this machine")

    monkeypatch.setattr(layout, "quantize", classmethod(counting_quantize))
    monkeypatch.setattr(ck, "scaled_mm_nvfp4", no_fp4_gemm)
    for n in marked:
        monkeypatch.setattr(dm.get_submodule(n), "_full_precision_mm", False)  # nvfp4 as a native op
    w4a16 = a
    ref = load_comfy_native(path)
    with torch.no_grad():
        a, b = ref(x, t, ctx, return_dict=False)[0], dm(x, t, ctx)
    # every NVFP4 layer quantized its input once per call, with the file's input_scale
    assert len(quantized_inputs) == len(marked) and all(sc is not None and sc.numel() == 1 for sc in quantized_inputs)
    diff = (a - b).abs()
    assert float(diff.median()) <= 1e-5 and float(diff.norm() / a.norm()) <= 2e-3
    assert float((a - w4a16).norm() / a.norm()) > 1e-2  # and quantizing the inputs does change the output
    assert patcher is not None
