"""train: one training step (forward, v-MSE loss, backward, AdamW step) of the 2B and 5B at 480x720x49 (latents
13x60x90, S = 17,776), batch 1, random weights in the run's dtype (bf16 on a GPU: parameters, gradients and AdamW
states all bf16, no fp32 master copy). Four settings: full fine-tune or LoRA (peft, rank 128 on our fused to_qkv and
to_out; on diffusers' to_q, to_k, to_v, to_out.0, CogVideoX's finetune targets), each with and without activation
checkpointing of every block. Ours (compile_blocks and eager) against diffusers' CogVideoXTransformer3DModel (eager
and regionally compiled; enable_gradient_checkpointing). Step time, peak memory, MFU = 3 x the forward's GEMM +
attention FLOPs (model FLOPs: the recomputation of checkpointing is not counted) per second over the matmul
ceiling. On a CPU: the tiny preset, LoRA rank 4.
"""
from __future__ import annotations

import torch

from .. import flops
from ..runner import Case, Context, Suite, Variant
from . import _build

BATCH = 1
# Published memory figures for CogVideoX-5B fine-tuning at 480x720x49, printed beside the full-size 5B rows.
ANCHORS = {
    "lora": {"cogvideox_finetune_gb": 24, "finetrainers_gb": 18},
    "full": {"cogvideox_finetune_zero2_gb_per_gpu": 42, "finetrainers_gb": 53},
}
SETTINGS = {"train-full": ("full", False), "train-full-ckpt": ("full", True),
            "train-lora": ("lora", False), "train-lora-ckpt": ("lora", True)}
OURS_TARGETS, DIFFUSERS_TARGETS = ("to_qkv", "to_out"), ("to_q", "to_k", "to_v", "to_out.0")


def _peft_missing() -> str | None:
    try:
        import peft  # noqa: F401
        return None
    except ImportError as e:
        return f"peft not importable (pip install peft, the 'train' extra): {e}"


def _diffusers_missing() -> str | None:
    try:
        import diffusers  # noqa: F401
        return None
    except ImportError as e:
        return f"diffusers not importable: {e}"


def _step_fn(model, forward, inputs):
    """The timed function: zero_grad, forward, v-MSE against a fixed target, backward, AdamW step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    x, text, t, target = inputs

    def step():
        opt.zero_grad(set_to_none=True)
        loss = (forward(model, x, text, t).float() - target.float()).pow(2).mean()
        loss.backward()
        opt.step()
        return loss
    return step


def _case(model_name: str, ctx: Context) -> Case:
    cfg = _build.transformer_config(model_name, ctx)
    latent = _build.LATENT[ctx.size]
    s = flops.DiTShape.from_config(cfg, BATCH, *latent)
    work = 3 * flops.dit_step_flops(s, "3d")
    gpu = ctx.device.type == "cuda"
    rank = 128 if ctx.full else 4

    def build() -> list[Variant]:
        training, = _build.require_cogvideox("training")
        x, text, t = _build.step_inputs(cfg, ctx, latent, batch=BATCH)
        t = torch.full_like(t, 500)
        target = torch.randn(x.shape, generator=torch.Generator(device=ctx.device).manual_seed(1),
                             device=ctx.device, dtype=ctx.dtype)
        inputs = (x, text, t, target)

        def ours(compile_, lora, ckpt):
            def make():
                transformer, = _build.require_cogvideox("transformer")
                with _build.on_device(ctx):
                    m = transformer.CogVideoXTransformer(cfg, use_kernels=None, checkpointing=int(ckpt))
                m = m.to(device=ctx.device, dtype=ctx.dtype).train()
                if lora:   # before compiling, so that the compiled blocks contain the adapters
                    training.add_lora(m, rank=rank, targets=OURS_TARGETS)
                if compile_:
                    torch._dynamo.reset()
                    transformer.compile_blocks(m)
                return _step_fn(m, lambda m_, x_, c, t_: m_(x_, c, t_), inputs)
            return make

        def theirs(compile_, lora, ckpt):
            def make():
                m = _build.diffusers_transformer(cfg, ctx).train().requires_grad_(True)
                if ckpt:
                    m.enable_gradient_checkpointing()
                if lora:
                    training.add_lora(m, rank=rank, targets=DIFFUSERS_TARGETS)
                if compile_:   # _build.diffusers_transformer's recipe, applied after the adapters
                    torch._dynamo.reset()
                    if getattr(m, "_repeated_blocks", None):
                        m.compile_repeated_blocks(fullgraph=True)
                    else:
                        for block in m.transformer_blocks:
                            block.compile()
                rotary = _build.diffusers_rotary(cfg, x)

                def forward(m_, x_, c, t_):
                    return m_(hidden_states=x_, encoder_hidden_states=c, timestep=t_, image_rotary_emb=rotary,
                              return_dict=False)[0]
                return _step_fn(m, forward, inputs)
            return make

        no_compile, no_diffusers, no_peft = ctx.no_compile_reason, _diffusers_missing(), _peft_missing()
        variants = []
        for pass_, (kind, ckpt) in SETTINGS.items():
            lora = kind == "lora"
            skip_lora = no_peft if lora else None
            anchor = ANCHORS[kind] if ctx.full and model_name == "5b" else None
            common = dict(pass_=pass_, flops=work, budget_s=max(ctx.budget_s, 3.0) if gpu else None, max_reps=10,
                          paper=anchor, extra={"model": model_name, "lora_rank": rank if lora else None,
                                               "checkpointing": ckpt, "mfu_basis": "3 x forward model FLOPs"})
            variants += [
                Variant("ours", ours(True, lora, ckpt), skip=skip_lora or no_compile, warmup=2,
                        backend="kernels + compile_blocks" if gpu else "references + compile_blocks", **common),
                Variant("ours-eager", ours(False, lora, ckpt), skip=skip_lora,
                        backend="kernels" if gpu else "references (CPU)", **common),
                Variant("diffusers", theirs(False, lora, ckpt), skip=no_diffusers or skip_lora,
                        backend="diffusers 0.42.1 eager", **common),
                Variant("diffusers-compile", theirs(True, lora, ckpt), skip=no_diffusers or skip_lora or no_compile,
                        warmup=2, backend="diffusers + per-block torch.compile", **common),
            ]
        return variants

    shape = {"B": BATCH, "latent": list(latent), "seq_len": s.seq_len, "layers": cfg.num_layers,
             "dim": cfg.inner_dim, "heads": cfg.num_attention_heads}
    return Case(f"train-step {model_name}", shape, build, est_bytes=_lora_ckpt_bytes(cfg, ctx, latent))


def _lora_ckpt_bytes(cfg, ctx: Context, latent) -> int:
    """The smallest setting's memory (LoRA + checkpointing: the weights, one block's activations, the block
    inputs kept for recomputation), for the fit check; larger settings that run out of memory become error rows."""
    item = torch.tensor([], dtype=ctx.dtype).element_size()
    F_, H, W = latent
    S = cfg.max_text_seq_length + (F_ // (cfg.patch_size_t or 1)) * (H // cfg.patch_size) * (W // cfg.patch_size)
    block_act = 16 * BATCH * S * cfg.inner_dim * item
    kept = cfg.num_layers * BATCH * S * cfg.inner_dim * item
    return _build.transformer_params(cfg) * item + block_act + kept


def cases(ctx: Context) -> list[Case]:
    _build.require_cogvideox("transformer", "config", "training")
    return [_case(m, ctx) for m in ctx.models]


def notes(ctx: Context) -> list[str]:
    lines = ["MFU = 3 x (GEMM + attention FLOPs of the forward) / step time / measured matmul TFLOP/s; the "
             "recomputation under checkpointing is not counted (model FLOPs).",
             "Anchors, CogVideoX-5B at 480x720x49: CogVideoX's own fine-tuning needs 24 GB for LoRA and 42 GB per "
             "GPU for a full fine-tune under ZeRO-2; finetrainers reports 18 GB (LoRA) / 53 GB (full). Ours here: "
             "one GPU, bf16 weights, gradients and AdamW states, no ZeRO sharding, no CPU offload.",
             "LoRA: ours adapts the fused to_qkv with one rank-r adapter, diffusers to_q, to_k, to_v with three."]
    if ctx.device.type != "cuda":
        lines.append("CPU run: tiny preset (latents 3x8x12), LoRA rank 4; the 2B / 5B steps at 480x720x49 need a GPU.")
    return lines


SUITE = Suite("train", "one training step (fwd + bwd + AdamW), full / LoRA, with and without checkpointing, "
                       "ours vs diffusers", cases, notes)
