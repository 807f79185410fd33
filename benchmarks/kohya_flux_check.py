"""Try kohya's flux_train_network on mini-flow through dvar's kohya plugin (issue 24, point 2).

    HF_HUB_OFFLINE=1 python benchmarks/kohya_flux_check.py SD_SCRIPTS [--out OUT] [--model FOLDER]

Run it with the python of an environment with sd-scripts' requirements, dvar and dvar-lab (the
venv of docs/kohya.md). Steps:

1. the model: ``--model``, else mini-flow (``lab/dvar_lab/assets/mini-flow``), else, while its
   weights are not there, a randomly initialised model of its architecture (the ``build_*``
   functions of ``benchmarks/embedded/pretrain_mini_flow.py``) written as a ``FluxPipeline`` folder
   in ``OUT/mini-flow-random``;
2. its parts converted into the files ``flux_train_network.py`` takes (``OUT/kohya/``): the
   transformer as one safetensors file with BFL (FLUX.1) key names, the VAE with the AE's (LDM) key
   names, CLIP and T5 as transformers state dicts, the two tokenizers in ``--tokenizer_cache_dir``'s
   layout. The transformer file is checked: kohya's own ``flux_models.Flux``, built with mini-flow's
   sizes, loads it strictly and gives diffusers' ``FluxTransformer2DModel``'s output;
3. kohya's four loaders (``flux_utils.load_flow_model``, ``load_clip_l``, ``load_t5xxl``,
   ``load_ae``), each on its file;
4. ``python -m dvar.integrations.kohya flux_train_network ... --early_stop`` on the bundled concept,
   given (a) the diffusers folder, (b) the converted transformer file.

A run passes when it trains and DVAR stops it before ``--max_train_steps`` with the LoRA written,
or when it fails exactly as docs/kohya.md ("Flux on mini-flow") records (``EXPECTED``: the exception
and the sd-scripts function it comes from). Anything else (another failure, a run that trains but
does not stop) fails the check, so the doc cannot go stale silently. Prints one JSON line (also
``OUT/kohya_flux_check.json``); exit 0 when every step passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

#: How each case fails at sd-scripts 48d368fa (docs/kohya.md, "Flux on mini-flow"):
#: (exception type, sd-scripts file and function of the deepest frame there, text in the message).
EXPECTED: Dict[str, tuple] = {
    "run-folder": ("FileNotFoundError", "library/flux_utils.py:analyze_checkpoint_state",
                   "diffusion_pytorch_model-00001-of-00003.safetensors"),
    "run-files": ("RuntimeError", "library/flux_utils.py:load_flow_model", "size mismatch for img_in.weight"),
    "load_flow_model": ("RuntimeError", "library/flux_utils.py:load_flow_model", "size mismatch for img_in.weight"),
    "load_flow_model-diffusers-file": ("RuntimeError", "library/flux_utils.py:load_flow_model",
                                       "size mismatch for img_in.weight"),
    "load_clip_l": ("RuntimeError", "library/flux_utils.py:load_clip_l", "size mismatch for text_model."),
    "load_t5xxl": ("RuntimeError", "library/flux_utils.py:load_t5xxl", "size mismatch for shared.weight"),
    "load_ae": ("RuntimeError", "library/flux_utils.py:load_ae", "size mismatch for encoder.conv_in.weight"),
}

# --------------------------------------------------------------------------- the model


def random_mini_flow(out: Path) -> Path:
    """A FluxPipeline folder of mini-flow's architecture with random transformer and T5 weights
    (mini-SD's VAE and CLIP, as mini-flow), written by pretrain_mini_flow's own export."""
    from diffusers import AutoencoderKL

    from benchmarks.embedded.pretrain_mini_flow import build_t5, build_t5_tokenizer, build_transformer, export
    from dvar.models import mini_sd

    if (out / "model_index.json").is_file():
        return out
    torch.manual_seed(0)
    tokenizer_2 = build_t5_tokenizer()
    vae = AutoencoderKL.from_pretrained(mini_sd(), subfolder="vae", torch_dtype=torch.float32)
    latents = {"shift_factor": -0.80, "scaling_factor": 0.31}  # about mini-flow's measured ones
    export(out, mini_sd(), vae, build_transformer(), build_t5(len(tokenizer_2)), tokenizer_2, latents,
           {"random_weights": True})
    return out


def choose_model(given: Optional[str], out: Path) -> tuple[Path, bool]:
    if given:
        return Path(given).resolve(), False
    bundled = REPO / "lab" / "dvar_lab" / "assets" / "mini-flow"
    if (bundled / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        return bundled, False
    return random_mini_flow(out / "mini-flow-random"), True


# --------------------------------------------------------------------------- conversion

#: BFL (FLUX.1 single-file) name -> diffusers names whose weights it concatenates, per block kind
TOP = {"img_in": ["x_embedder"], "txt_in": ["context_embedder"],
       "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
       "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
       "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
       "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
       "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
       "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
       "final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"]}
DOUBLE = {"img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
          "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
          "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
          "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
          "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
          "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"]}
DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight"}
SINGLE = {"modulation.lin": ["norm.linear"], "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
          "linear2": ["proj_out"]}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}


def transformer_to_bfl(state: Dict[str, torch.Tensor], n_double: int, n_single: int) -> Dict[str, torch.Tensor]:
    """diffusers ``FluxTransformer2DModel`` weights -> the BFL single-file names kohya's ``Flux`` has
    (the inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, which fixes the
    width at 3072 and so cannot be used at mini-flow's 128). Every weight is used exactly once."""
    table: Dict[str, List[str]] = {}

    def linear(bfl: str, names: List[str]) -> None:
        for part in ("weight", "bias"):
            table[f"{bfl}.{part}"] = [f"{name}.{part}" for name in names]

    for bfl, names in TOP.items():
        linear(bfl, names)
    for i in range(n_double):
        for bfl, names in DOUBLE.items():
            linear(f"double_blocks.{i}.{bfl}", [f"transformer_blocks.{i}.{n}" for n in names])
        for bfl, name in DOUBLE_NORMS.items():
            table[f"double_blocks.{i}.{bfl}"] = [f"transformer_blocks.{i}.{name}"]
    for i in range(n_single):
        for bfl, names in SINGLE.items():
            linear(f"single_blocks.{i}.{bfl}", [f"single_transformer_blocks.{i}.{n}" for n in names])
        for bfl, name in SINGLE_NORMS.items():
            table[f"single_blocks.{i}.{bfl}"] = [f"single_transformer_blocks.{i}.{name}"]
    out, used = {}, set()
    for bfl, names in table.items():
        present = [name in state for name in names]
        if all(present):
            out[bfl] = torch.cat([state[name] for name in names])
            used.update(names)
        elif any(present):
            raise KeyError(f"{bfl}: only some of {names} are in the diffusers weights")
    left = sorted(set(state) - used)
    if left:
        raise KeyError(f"diffusers weights without a BFL name: {left[:5]}")
    # diffusers' AdaLayerNormContinuous gives (scale, shift), BFL's LastLayer (shift, scale)
    for part in ("weight", "bias"):
        scale, shift = out[f"final_layer.adaLN_modulation.1.{part}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale])
    return out


def vae_to_ldm(state: Dict[str, torch.Tensor], levels: int) -> Dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` weights -> the LDM names of BFL's ``ae.safetensors``. BFL's AE has no
    ``quant_conv``/``post_quant_conv``; SD's VAE (mini-flow's) has both: they keep their names."""
    rules = [
        (r"^(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"{m[1]}.down.{m[2]}.block.{m[3]}."),
        (r"^(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"{m[1]}.down.{m[2]}.downsample."),
        (r"^(decoder)\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
         lambda m: f"{m[1]}.up.{levels - 1 - int(m[2])}.block.{m[3]}."),
        (r"^(decoder)\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"{m[1]}.up.{levels - 1 - int(m[2])}.upsample."),
        (r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
        (r"\.mid_block\.attentions\.0\.", lambda m: ".mid.attn_1."),
        (r"\.attn_1\.group_norm\.", lambda m: ".attn_1.norm."),
        (r"\.attn_1\.to_(q|k|v)\.", lambda m: f".attn_1.{m[1]}."),
        (r"\.attn_1\.to_out\.0\.", lambda m: ".attn_1.proj_out."),
        (r"\.conv_norm_out\.", lambda m: ".norm_out."),
        (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replace in rules:
            key = re.sub(pattern, replace, key)
        if ".attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # diffusers' attention uses Linear, the LDM one 1x1 convolutions
        out[key] = value
    return out


def convert(model: Path, out: Path) -> Dict[str, Any]:
    """Write OUT/kohya/{flux,ae,clip_l,t5xxl}.safetensors and OUT/tokenizers/ from the diffusers folder."""
    from safetensors.torch import load_file, save_file
    from transformers import T5EncoderModel

    from dvar.models import load_exactly, portable_clip_text_state_dict

    folder = out / "kohya"
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "transformer" / "config.json").read_text())
    dit = load_file(str(model / "transformer" / "diffusion_pytorch_model.safetensors"))
    bfl = transformer_to_bfl(dit, config["num_layers"], config["num_single_layers"])
    save_file(bfl, str(folder / "flux.safetensors"))
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    vae = load_file(str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    save_file(vae_to_ldm(vae, len(vae_config["block_out_channels"])), str(folder / "ae.safetensors"))
    clip = {}
    for file in sorted((model / "text_encoder").glob("*.safetensors")):
        clip.update(load_file(str(file)))
    save_file(portable_clip_text_state_dict(clip), str(folder / "clip_l.safetensors"))
    t5 = load_exactly(T5EncoderModel, model, subfolder="text_encoder_2", torch_dtype=torch.float16)
    # every key of transformers' T5EncoderModel, the tied embedding too (as kohya's T5-XXL files)
    save_file({k: v.clone().contiguous() for k, v in t5.state_dict().items()}, str(folder / "t5xxl.safetensors"))
    tokenizers = out / "tokenizers"  # kohya: <--tokenizer_cache_dir>/<hub id with / as _>
    for name, hub_id in (("tokenizer", "openai/clip-vit-large-patch14"), ("tokenizer_2", "google/t5-v1_1-xxl")):
        target = tokenizers / hub_id.replace("/", "_")
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(model / name, target)
    return {"files": {p.name: p.stat().st_size for p in sorted(folder.iterdir())}, "transformer_config": config,
            "vae": {k: vae_config[k] for k in ("block_out_channels", "latent_channels", "norm_num_groups",
                                               "scaling_factor", "shift_factor", "use_quant_conv")}}


def check_transformer_file(sd_scripts: Path, model: Path, bfl_file: Path) -> Dict[str, Any]:
    """kohya's ``flux_models.Flux`` built with mini-flow's sizes (kohya itself builds FLUX.1's) loads the
    BFL file strictly and matches diffusers' transformer: the conversion is right, the sizes are all that differ."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    sys.path.insert(0, str(sd_scripts))
    from library import flux_models, flux_utils  # kohya's

    reference = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=torch.float32).eval()
    c = reference.config
    params = flux_models.FluxParams(
        in_channels=c.in_channels, vec_in_dim=c.pooled_projection_dim, context_in_dim=c.joint_attention_dim,
        hidden_size=c.num_attention_heads * c.attention_head_dim, mlp_ratio=4.0, num_heads=c.num_attention_heads,
        depth=c.num_layers, depth_single_blocks=c.num_single_layers, axes_dim=list(c.axes_dims_rope), theta=10_000,
        qkv_bias=True, guidance_embed=c.guidance_embeds)
    kohya_model = flux_models.Flux(params).eval()
    info = kohya_model.load_state_dict({k: v.float() for k, v in load_file(str(bfl_file)).items()}, strict=True)
    gen = torch.Generator().manual_seed(0)
    side = 8  # 64x64 pixels -> 16x16 latents -> 8x8 packed tokens
    img = torch.randn(1, side * side, c.in_channels, generator=gen)
    txt = torch.randn(1, 32, c.joint_attention_dim, generator=gen)
    pooled = torch.randn(1, c.pooled_projection_dim, generator=gen)
    sigma = torch.tensor([0.7])
    img_ids, txt_ids = flux_utils.prepare_img_ids(1, side, side), torch.zeros(1, 32, 3)
    with torch.no_grad():
        ours = kohya_model(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=sigma, y=pooled)
        theirs = reference(hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled, timestep=sigma,
                           img_ids=img_ids[0], txt_ids=txt_ids[0], return_dict=False)[0]
    difference = float((ours - theirs).abs().max())
    result = {"kohya_flux_params": dict(vars(params)), "strict_load": str(info),
              "max_abs_difference": difference, "output_scale": float(theirs.abs().mean())}
    result["ok"] = difference < 1e-4
    return result


# --------------------------------------------------------------------------- kohya's loaders and runs


def failure(error: BaseException, tb: List[traceback.FrameSummary], sd_scripts: Path) -> Dict[str, Any]:
    """Type, first lines of the message and the deepest sd-scripts frame (file:function and line)."""
    frames = [f for f in tb if Path(f.filename).resolve().is_relative_to(sd_scripts)]
    lines = str(error).splitlines()
    result = {"type": type(error).__name__, "message": " ".join(l.strip() for l in lines[:2])[:400],
              "size_mismatches": sum("size mismatch" in line for line in lines), "where": None, "line": None}
    if frames:
        relative = Path(frames[-1].filename).resolve().relative_to(sd_scripts)
        result.update(where=f"{relative}:{frames[-1].name}", line=f"{relative}:{frames[-1].lineno}: {frames[-1].line}")
    return result


def matches(name: str, found: Dict[str, Any]) -> bool:
    kind, where, text = EXPECTED[name]
    return found.get("type") == kind and found.get("where") == where and text in (found.get("message") or "")


def try_loaders(sd_scripts: Path, model: Path, folder: Path) -> Dict[str, Any]:
    sys.path.insert(0, str(sd_scripts))
    from library import flux_utils  # kohya's

    calls: Dict[str, Callable[[], Any]] = {
        "load_flow_model": lambda: flux_utils.load_flow_model(str(folder / "flux.safetensors"), torch.float32, "cpu"),
        "load_flow_model-diffusers-file": lambda: flux_utils.load_flow_model(
            str(model / "transformer" / "diffusion_pytorch_model.safetensors"), torch.float32, "cpu"),
        "load_clip_l": lambda: flux_utils.load_clip_l(str(folder / "clip_l.safetensors"), torch.float32, "cpu"),
        "load_t5xxl": lambda: flux_utils.load_t5xxl(str(folder / "t5xxl.safetensors"), torch.float32, "cpu"),
        "load_ae": lambda: flux_utils.load_ae(str(folder / "ae.safetensors"), torch.float32, "cpu"),
    }
    results = {}
    for name, call in calls.items():
        try:
            call()
            results[name] = {"loaded": True, "ok": False}  # it loaded: the doc is out of date, look again
        except Exception as error:  # noqa: BLE001 - every failure is the result
            found = failure(error, traceback.extract_tb(error.__traceback__), sd_scripts)
            results[name] = {**found, "as_documented": matches(name, found)}
            results[name]["ok"] = results[name]["as_documented"]
    return results


def parse_log(text: str, sd_scripts: Path) -> Dict[str, Any]:
    """The last traceback of a kohya log: exception, message, deepest sd-scripts frame."""
    if "Traceback (most recent call last)" not in text:
        return {}
    block = text.rsplit("Traceback (most recent call last)", 1)[1].splitlines()
    found = (re.match(r'\s*File "(.+)", line (\d+), in (.+)', line) for line in block)
    frames = [(m[1], int(m[2]), m[3]) for m in found if m]
    ours = [f for f in frames if Path(f[0]).resolve().is_relative_to(sd_scripts)]
    last = next((l for l in reversed(block) if re.match(r"^[\w.]+(Error|Exception)\b", l)), "")
    kind, _, message = last.partition(": ")
    index = block.index(last) if last else len(block)
    message = " ".join([message] + [l.strip() for l in block[index + 1 : index + 2]])
    where = line = None
    if ours:
        file, lineno, function = ours[-1]
        relative = Path(file).resolve().relative_to(sd_scripts)
        source = (sd_scripts / relative).read_text().splitlines()[lineno - 1].strip()
        where, line = f"{relative}:{function}", f"{relative}:{lineno}: {source}"
    return {"type": kind.rsplit(".", 1)[-1], "message": message[:400], "where": where, "line": line,
            "size_mismatches": text.count("size mismatch for")}


def run_plugin(name: str, sd_scripts: Path, out: Path, data: Dict[str, Any], model_flag: str) -> Dict[str, Any]:
    folder, output = out / "kohya", out / name
    shutil.rmtree(output, ignore_errors=True)
    command = [
        sys.executable, "-m", "dvar.integrations.kohya", "flux_train_network", "--sd_scripts", str(sd_scripts),
        "--pretrained_model_name_or_path", model_flag, "--clip_l", str(folder / "clip_l.safetensors"),
        "--t5xxl", str(folder / "t5xxl.safetensors"), "--ae", str(folder / "ae.safetensors"),
        "--tokenizer_cache_dir", str(out / "tokenizers"), "--t5xxl_max_token_length", "32",
        "--train_data_dir", data["train_data_dir"], "--caption_extension", ".txt", "--resolution", "64",
        "--network_module", "networks.lora_flux", "--network_dim", "4", "--network_alpha", "4",
        "--network_train_unet_only", "--learning_rate", "1e-3", "--train_batch_size", "1", "--seed", "42",
        "--cache_latents", "--cache_text_encoder_outputs", "--max_data_loader_n_workers", "0",
        "--mixed_precision", "no", "--sdpa", "--guidance_scale", "1.0", "--timestep_sampling", "sigmoid",
        "--model_prediction_type", "raw", "--discrete_flow_shift", "1.0", "--save_model_as", "safetensors",
        "--output_name", "lora", "--output_dir", str(output), "--max_train_steps", "300",
        "--early_stop", "--early_stop_window", "100", "--early_stop_threshold", "0.4", "--early_stop_eval_every", "1",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    log = out / f"{name}.log"
    start = time.time()
    with open(log, "w") as handle:
        rc = subprocess.run(command, cwd=sd_scripts, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
    shown = [c.replace(str(out), "OUT").replace(str(sd_scripts), "SD_SCRIPTS") for c in command[1:]]
    result: Dict[str, Any] = {"command": " ".join(shown), "exit_code": rc, "seconds": round(time.time() - start, 1),
                              "log": str(log)}
    summary = output / "dvar_summary.json"
    if rc == 0 and summary.is_file():  # it trained: DVAR must have stopped it, and the LoRA be there
        s = json.loads(summary.read_text())
        result.update(trained=True, outcome=s["outcome"], stop_step=s["stop_step"], reason=s["reason"],
                      lora=(output / "lora.safetensors").is_file())
        result["ok"] = s["outcome"] == "early_stop" and s["stop_step"] < s["max_train_steps"] and result["lora"]
        return result
    found = parse_log(log.read_text(), sd_scripts)
    result.update(trained=False, **found, as_documented=bool(found) and matches(name, found))
    result["ok"] = result["as_documented"]
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sd_scripts", type=Path, help="a kohya-ss/sd-scripts checkout")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dvar-kohya-flux-check"))
    parser.add_argument("--model", default=None, help="a FluxPipeline folder (default: mini-flow, or a random one)")
    args = parser.parse_args(argv)
    sd_scripts, out = args.sd_scripts.resolve(), args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    import kohya_check  # benchmarks/kohya_check.py: versions, and the concept in kohya's folder layout

    model, random_weights = choose_model(args.model, out)
    result: Dict[str, Any] = {"versions": kohya_check.versions(str(sd_scripts)), "model": str(model),
                              "random_weights": random_weights}
    result["conversion"] = convert(model, out)
    data = kohya_check.data(str(out / "data"))
    data["tokenizer_cache_dir"] = str(out / "tokenizers")
    result["transformer_file"] = check_transformer_file(sd_scripts, model, out / "kohya" / "flux.safetensors")
    result["loaders"] = try_loaders(sd_scripts, model, out / "kohya")
    result["runs"] = {name: run_plugin(name, sd_scripts, out, data, flag) for name, flag in
                      (("run-folder", str(model)), ("run-files", str(out / "kohya" / "flux.safetensors")))}
    steps = [result["transformer_file"], *result["loaders"].values(), *result["runs"].values()]
    result["ok"] = all(step["ok"] for step in steps)
    (out / "kohya_flux_check.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
