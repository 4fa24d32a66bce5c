"""LightningModule for step-wise MCoT fine-tuning of BAGEL / FoX backbones with LoRA, DoRA or QLoRA.

One training step on a packed batch (see ../docs/ARCHITECTURE.md)::

    out   = backbone(batch)                            # routed MoT forward, joint attention
    CE    = sum_s w_s * sum_{i in s} ce_i / N_ce       # plan / reflect / answer text
    MSE   = sum_s w_s * sum_{i in s} ||v_hat_i - v_i||^2 / (C N_m)   # draft / refine images
    total = w_ce CE + w_mse MSE + w_spatial L_spatial + w_kl L_kl + w_sem L_sem

With ``preference`` (DPO on reflection pairs, ``data.preference``) the step is instead::

    logp  = -sum CE per packed sequence, policy and reference (the adapter before step 0, computed once;
            or adapters off, no grad, every step)
    total = DPO(logp[chosen], logp[rejected], ref[chosen], ref[rejected]) + w_sft CE(chosen)

All random draws of a step (VAE posterior, flow noise; timesteps and dropout come from the data
module) derive from ``(seed, global batch index)``, so a resumed run reproduces an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from pathlib import Path

import lightning as L
import torch

from ftkit.adapters.config import AdapterConfig
from ftkit.errors import FtkitError
from ftkit.models import kernels
from ftkit.models.folders import parse_dtype
from ftkit.segments import STEP_NAMES, Step
from ftkit.train.losses import LossWeights, Preference
from ftkit.train.tiny import TinyBackbone

log = logging.getLogger("ftkit")


class NonFiniteError(FtkitError):
    """A loss or gradient became NaN/inf: the run stops before anything non-finite is written."""


def _typed(cls, value):
    """A config section as its dataclass (LightningCLI passes the dataclass, Python callers may pass a dict)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls(**value)
    raise TypeError(f"expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")


class MCoTModule(L.LightningModule):
    """Args:
        model_path: backbone folder (BAGEL release folder or an ftkit FoX folder).
        backbone: "bagel" | "fox".
        dtype: weights' compute dtype ("bf16" on GPU, "fp32" or "bf16" on CPU).
        quantize: None | "nf4" (QLoRA) | "int8" for the decoder's Linear layers.
        three_experts: upcycle BAGEL's understanding expert into linguistic + semantic.
        adapter: :class:`~ftkit.adapters.config.AdapterConfig` (method, preset, r, alpha, ...); ``null`` with
            ``full_finetune: true`` trains all decoder/connector weights instead.
        preference: :class:`~ftkit.train.losses.Preference` (beta, sft, experts, reference): train
            reflections by DPO on the data module's preference pairs (``data.preference``) instead of the
            step-wise losses; the reference is the adapter as training starts (``reference: init``, trl's choice
            when re-training an adapter; for a new adapter the base model) or the model with adapters disabled.
        init_adapter: an adapter folder to continue (a second round on self-critique data): loaded with
            its own saved config, which replaces ``adapter``'s, and trained further.
        loss: :class:`~ftkit.train.losses.LossWeights` (ce, mse, steps: {plan: 1, ...}, spatial, kl_prior, semantic).
        lr, weight_decay, betas, warmup_steps, min_lr_ratio: AdamW with linear warm-up then cosine decay.
        lr_scale: per-expert learning-rate multipliers, e.g. ``{generative: 0.25}``: the parameters of that
            expert (its decoder modules or their adapters; for ``generative`` also the flow connectors
            vae2llm / llm2vae / time_embedder) train at ``lr * scale``, the rest at ``lr``. Experts are named
            as in ``preference.experts`` (``understanding`` / ``linguistic``, ``semantic``, ``generative``).
        timestep_shift: training timestep shift s (t' = s t / (1 + (s-1) t)); upstream trains with 1.0
            at low resolution, 2.0+ at high.
        region_noise: region-conditioned refinement (:meth:`BagelModel.embed`): a refinement whose reflection
            names regions is noised only there, its other tokens stay clean at timestep 0 and carry no flow
            loss; sample such an adapter with ``--inpaint clean``.
        gradient_checkpointing: recompute each decoder / ViT layer in backward.
        kernels: "auto" (Liger on CUDA if installed, else torch) | "liger" | "torch".
        attn_impl: "auto" (flex on CUDA, SDPA with a dense mask on CPU) | "sdpa" | "flex".
        ce_chunk_size: rows per chunk of the torch path's cross-entropy (full logits never exist).
        tiny: :class:`~ftkit.train.tiny.TinyBackbone`: when ``model_path`` does not exist, build a tiny random
            BAGEL there (the tiny-mcot recipe); real recipes leave it null and fail with a hint.
        vae_cache_size: cache the frozen VAE encoder's posterior moments of this many images (exact;
            the posterior is still sampled each step). Useful on small datasets / CPU.
        seed: seed for the step's random draws.
        nonfinite: what a non-finite loss or gradient does: "stop" the run (an error naming the step and the
            batch's record ids; nothing non-finite is ever checkpointed or exported) or "skip" the batch (no
            optimizer step), at most ``max_skipped`` times, then stop.
    """

    def __init__(
        self,
        model_path: str,
        backbone: str = "bagel",
        dtype: str = "bf16",
        quantize: str | None = None,
        three_experts: bool = False,
        adapter: AdapterConfig | None = None,
        full_finetune: bool = False,
        loss: LossWeights | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 10,
        min_lr_ratio: float = 0.1,
        lr_scale: dict[str, float] | None = None,
        timestep_shift: float = 1.0,
        region_noise: bool = False,
        gradient_checkpointing: bool = False,
        kernels: str = "auto",
        attn_impl: str = "auto",
        ce_chunk_size: int = 1024,
        tiny: TinyBackbone | None = None,
        vae_cache_size: int = 0,
        seed: int = 0,
        nonfinite: str = "stop",
        max_skipped: int = 10,
        init_adapter: str | None = None,
        preference: Preference | None = None,
    ):
        super().__init__()
        adapter, loss, tiny = _typed(AdapterConfig, adapter), _typed(LossWeights, loss), _typed(TinyBackbone, tiny)
        preference = _typed(Preference, preference)
        self.save_hyperparameters()
        # checkpoints and logs keep plain values (no ftkit classes to unpickle)
        for key, value in (("adapter", adapter), ("loss", loss), ("tiny", tiny), ("preference", preference)):
            self.hparams[key] = None if value is None else dataclasses.asdict(value)
        if adapter is None and not full_finetune:
            raise ValueError("set an adapter (LoRA/DoRA/QLoRA) or full_finetune: true")
        if quantize and full_finetune:
            raise ValueError("quantize (QLoRA) needs an adapter: 4-bit weights cannot be trained directly")
        if preference is not None and adapter is None:
            raise ValueError("model.preference trains an adapter against the same model with adapters disabled: set "
                             "model.adapter (or model.init_adapter), not full_finetune")
        self.adapter_cfg = adapter
        self.preference = preference
        self.loss_weights = loss or LossWeights()
        from ftkit.adapters.config import EXPERT_SUFFIX

        for name, scale in (lr_scale or {}).items():
            if name not in EXPERT_SUFFIX:
                raise ValueError(f"model.lr_scale: unknown expert {name!r}; experts are {', '.join(EXPERT_SUFFIX)}")
            if not (isinstance(scale, (int, float)) and 0.0 < float(scale) < float("inf")):
                raise ValueError(f"model.lr_scale.{name}: a finite number > 0, got {scale!r} (to freeze an expert, "
                                 "leave it out of the adapter preset)")
        if len({float(v) for k, v in (lr_scale or {}).items() if EXPERT_SUFFIX[k] == ""}) > 1:
            raise ValueError("model.lr_scale: understanding and linguistic name the same expert; give one scale")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"model.nonfinite {nonfinite!r}: choose stop or skip")
        self._skipped = 0
        self._ref_logps: dict[str, list[float]] | None = None  # preference.reference init: per record id
        self.model = None
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self._t0 = None
        self._tokens = 0

    # ------------------------------------------------------------------ model
    def prepare_data(self) -> None:
        hp = self.hparams
        if hp.tiny is not None and not Path(hp.model_path).exists():
            from ftkit.train.tiny import ensure_tiny_bagel

            ensure_tiny_bagel(hp.model_path, **hp.tiny)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        from ftkit.adapters.attach import attach_adapters, enable_gradient_checkpointing

        path = Path(hp.model_path)
        if not path.exists() and hp.tiny is not None:
            from ftkit.train.tiny import ensure_tiny_bagel

            ensure_tiny_bagel(path, **hp.tiny)
        dtype = parse_dtype(hp.dtype)
        device = self.device if self.device.type != "meta" else torch.device("cpu")
        if hp.backbone == "bagel":
            from ftkit.models.loading import load_bagel

            model = load_bagel(path, dtype=dtype, quantize=hp.quantize, device=device,
                               three_experts=hp.three_experts, timestep_shift=hp.timestep_shift)
        elif hp.backbone == "fox":
            from ftkit.models.fox import load_fox

            model = load_fox(path, dtype=dtype, device=device, quantize=hp.quantize)
        else:
            raise ValueError(f"unknown backbone {hp.backbone!r} (bagel | fox)")
        if hp.init_adapter:
            from ftkit.adapters.attach import adapter_config_of
            from ftkit.adapters.io import load_adapter

            if self.adapter_cfg is None:
                raise ValueError("model.init_adapter continues an adapter: set model.adapter as well (the saved "
                                 "config replaces it), not full_finetune")
            load_adapter(model, hp.init_adapter)
            self.adapter_cfg = adapter_config_of(model)
            log.info("continuing the adapter in %s", hp.init_adapter)
        elif self.adapter_cfg is not None:
            attach_adapters(model, self.adapter_cfg)
        else:
            for n, p in model.named_parameters():
                trains = not (n.startswith("vae.") or n.endswith("pos_embed"))
                p.requires_grad_(trains)
                if trains and p.dtype != torch.float32:  # fp32 master weights and AdamW state
                    p.data = p.data.float()
            if dtype != torch.float32:
                log.info("full fine-tuning keeps fp32 master weights; run with trainer.precision bf16-mixed "
                         "for bf16 compute")
        if self.preference is not None:
            from ftkit.adapters.attach import train_only_experts

            train_only_experts(model, self.preference.experts)
        if hp.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if hp.vae_cache_size and model.vae is not None:
            model.enable_vae_cache(hp.vae_cache_size)
        model.train()
        if model.vae is not None:
            model.vae.eval()
        choice = kernels.set_backend(hp.kernels if (hp.kernels != "auto" or device.type == "cuda") else "torch")
        self.attn_impl = hp.attn_impl if hp.attn_impl != "auto" else ("flex" if device.type == "cuda" else "sdpa")
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("kernels: %s | attention: %s | dtype %s | quantize %s | trainable %.2fM of %.2fM params",
                 choice, self.attn_impl, hp.dtype, hp.quantize, n_train / 1e6, n_all / 1e6)
        mesh = getattr(self, "device_mesh", None) if self._trainer is not None else None
        if mesh is not None:
            from ftkit.train.distributed import shard_fsdp2

            shard_fsdp2(model, mesh)
        self.model = model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        bad = [k for k, v in checkpoint["state_dict"].items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteError(f"step {self.global_step}: refusing to checkpoint non-finite weights ({bad[0]} and "
                                 f"{len(bad) - 1} more)")
        checkpoint["ftkit"] = {"model_path": str(self.hparams.model_path), "trainable": sorted(keep)}
        if self._ref_logps is not None:
            checkpoint["ftkit"]["reference_logps"] = self._ref_logps

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._ref_logps = checkpoint.get("ftkit", {}).get("reference_logps", self._ref_logps)
        sd = checkpoint.get("state_dict", {})
        keep = {n for n, p in self.named_parameters() if p.requires_grad}
        missing = keep - set(sd)
        if missing:
            raise ValueError(f"checkpoint lacks trainable tensors {sorted(missing)[:5]} ... "
                             "(was it written by another recipe/adapter config?)")

    # ------------------------------------------------------------------ step
    def _draws(self, item):
        """Posterior eps per VAE image and flow noise per VAE token, from (seed, batch index), on CPU."""
        b = item.batch
        g = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + item.index)
        m = self.model
        ds = m.vae.downsample if m.vae is not None else m.cfg.vae_downsample
        zc = m.vae.z_channels if m.vae is not None else m.cfg.latent_channels
        eps = [torch.randn(zc, img.shape[1] // ds, img.shape[2] // ds, generator=g) for img in b.vae_images]
        nz = b.vae_token_indexes.numel()
        noise = torch.randn(nz, m.cfg.patch_latent_dim, generator=g)
        dev = self.device
        return [e.to(dev) for e in eps], noise.to(dev)

    def compute_losses(self, item) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from ftkit.adapters.attach import adapters_disabled
        from ftkit.train import losses as Ls

        if self.preference is not None:
            return self.preference_losses(item)
        b = item.batch
        m, lw = self.model, self.loss_weights
        eps, noise = self._draws(item)
        kw = dict(flow_noise=noise, vae_posterior_eps=eps, timestep_shift=self.hparams.timestep_shift,
                  attn_impl=self.attn_impl, region_noise=self.hparams.region_noise)
        out = m(b, **kw)
        step_w = lw.step_weights()
        logs: dict[str, torch.Tensor] = {}
        total = out.hidden.new_zeros((), dtype=torch.float32)
        head = m.language_model.lm_head.weight
        if b.ce_indexes.numel():
            ce_tok = Ls.per_token_ce(out.ce_hidden, head, b.ce_labels, chunk_size=self.hparams.ce_chunk_size)
            ce, per = Ls.step_breakdown(ce_tok, b.ce_step, step_w)
            total = total + lw.ce * ce
            logs["ce"] = ce.detach()
            logs.update({f"ce/{STEP_NAMES[Step(s)]}": v.detach() for s, v in per.items()})
        if b.mse_indexes.numel():
            mse_tok = Ls.flow_mse_per_token(out.velocity_pred, out.velocity_target)
            mse_step = b.mse_step[out.extras["mse_keep"].cpu()] if "mse_keep" in out.extras else b.mse_step
            mse, per = Ls.step_breakdown(mse_tok, mse_step, step_w)
            total = total + lw.mse * mse
            logs["mse"] = mse.detach()
            logs.update({f"mse/{STEP_NAMES[Step(s)]}": v.detach() for s, v in per.items()})
            if lw.spatial:
                sp = Ls.spatial_consistency_from_batch(b, out.flow, out.flow.rows, out.velocity_pred)
                total = total + lw.spatial * sp
                logs["spatial"] = sp.detach()
            if lw.semantic:
                se = Ls.semantic_consistency_from_batch(b, out.flow, out.flow.rows, out.velocity_pred)
                total = total + lw.semantic * se
                logs["semantic"] = se.detach()
        if lw.kl_prior and self.adapter_cfg is not None and b.ce_indexes.numel():
            reason = (b.ce_step == int(Step.PLAN)) | (b.ce_step == int(Step.REFLECT))
            if reason.any():
                with torch.no_grad(), adapters_disabled(m):
                    base = m(b, **kw)
                kl = Ls.kl_prior_preservation(out.ce_hidden[reason], base.ce_hidden[reason].detach(), head)
                total = total + lw.kl_prior * kl
                logs["kl_prior"] = kl.detach()
        logs["total"] = total.detach()
        return total, logs

    def _sequence_logps(self, item) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probability of each packed sequence's supervised text, per-token CE). Images are encoded at
        the VAE posterior mean, so a pair's two sequences (and every pass over them) see exactly the same one."""
        from ftkit.train import losses as Ls

        b, m = item.batch, self.model
        eps, noise = self._draws(item)
        out = m(b, flow_noise=noise, vae_posterior_eps=[torch.zeros_like(e) for e in eps],
                timestep_shift=self.hparams.timestep_shift, attn_impl=self.attn_impl)
        ce = Ls.per_token_ce(out.ce_hidden, m.language_model.lm_head.weight, b.ce_labels,
                             chunk_size=self.hparams.ce_chunk_size)
        return Ls.sequence_logps(ce, b.sample_ids[b.ce_indexes], item.num_samples), ce

    def _reference_logps(self, item) -> torch.Tensor:
        """The reference's sequence log-probabilities: the adapter as training started (``init``, computed once
        by :meth:`_precompute_reference`) or the model with adapters disabled (``base``, every step)."""
        from ftkit.adapters.attach import adapters_disabled

        if self.preference.reference == "base":
            with torch.no_grad(), adapters_disabled(self.model):
                return self._sequence_logps(item)[0]
        missing = [r for r in item.record_ids if r not in (self._ref_logps or {})]
        if missing:
            raise FtkitError(f"batch {item.index}: no reference log-probabilities for records {missing[:3]} (the "
                             "data changed since they were computed: start a new run)")
        ref = [v for r in item.record_ids for v in self._ref_logps[r]]
        return torch.tensor(ref, dtype=torch.float32, device=item.batch.ce_labels.device)

    @torch.no_grad()
    def _precompute_reference(self, dm) -> None:
        """``reference: init``: every pair's log-probabilities under the adapter as it is before step 0 (eval
        mode: no adapter dropout), keyed by record id, kept in checkpoints so a resumed run uses the same."""
        from ftkit.data.packer import pack
        from ftkit.train.datamodule import BatchItem

        ids = [str(dm.records[i].id) for i in range(len(dm.records))]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise FtkitError(f"model.preference.reference init keys pairs by record id: {dup!r} is not unique "
                             "across the datasets (rename, or use reference: base)")
        t0, was = time.perf_counter(), self.model.training
        self.model.eval()
        table: dict[str, list[float]] = {}
        for k, group in enumerate(dm.epoch_plan(0)):
            samples = [seq for i in group for seq in dm.samples(i)]
            item = BatchItem(pack(samples, dm.pack_cfg), 10**9 + k, len(samples), tuple(ids[i] for i in group))
            lp = self._sequence_logps(item.to(self.device))[0].tolist()
            for j, i in enumerate(group):
                table[ids[i]] = lp[2 * j: 2 * j + 2]
        self.model.train(was)
        if self.model.vae is not None:
            self.model.vae.eval()
        self._ref_logps = table
        log.info("reference log-probabilities of %d preference pairs computed in %.1f s", len(table),
                 time.perf_counter() - t0)

    def preference_losses(self, item) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """DPO on a pack of preference pairs: sequences ``2k`` (chosen) and ``2k + 1`` (rejected) share their
        context (module docstring)."""
        from ftkit.train import losses as Ls

        b, pref, n = item.batch, self.preference, item.num_samples
        if n % 2 or not b.ce_indexes.numel():
            raise FtkitError(f"batch {item.index}: a preference batch holds (chosen, rejected) pairs with supervised "
                             f"text ({n} sequences, {b.ce_indexes.numel()} CE tokens): set data.preference")
        logp, ce_tok = self._sequence_logps(item)
        ref = self._reference_logps(item)
        dpo, margin = Ls.dpo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], pref.beta)
        total = dpo
        logs = {"dpo": dpo.detach(), "reward_acc": (margin > 0).float().mean(), "margin": margin.mean(),
                "logp/chosen": logp[0::2].detach().mean(), "logp/rejected": logp[1::2].detach().mean()}
        if pref.sft:
            chosen = (b.sample_ids[b.ce_indexes] % 2) == 0
            sft = ce_tok[chosen].mean()
            total = total + pref.sft * sft
            logs["sft"] = sft.detach()
        logs["total"] = total.detach()
        return total, logs

    def _nonfinite(self, item, what: str) -> None:
        """Stop (or, with ``nonfinite: skip``, skip up to ``max_skipped`` batches) on a non-finite ``what``."""
        ids = ", ".join(item.record_ids[:8]) + (", ..." if len(item.record_ids) > 8 else "")
        msg = f"step {self.global_step}: non-finite {what} on batch {item.index} (records: {ids or 'unknown'})"
        self._skipped += 1
        if self.hparams.nonfinite == "skip" and self._skipped <= self.hparams.max_skipped:
            log.warning("%s; batch skipped (%d of at most %d)", msg, self._skipped, self.hparams.max_skipped)
            return
        raise NonFiniteError(f"{msg}; stopped before any non-finite weight was written (lower model.lr, or "
                             f"model.nonfinite skip with model.max_skipped > {self.hparams.max_skipped})")

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        # one reduction over all gradients (NaN or inf anywhere makes the norm non-finite), not one per tensor
        if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
            self._nonfinite(self._item, "gradient")
            for p in self.parameters():  # skipped: no update from this batch
                p.grad = None

    def training_step(self, item, batch_idx):
        loss, logs = self.compute_losses(item)
        self._item = item
        if not bool(torch.isfinite(loss)):
            self._nonfinite(item, "loss")
            return None
        bs = item.num_samples
        for k, v in logs.items():
            self.log(f"train/{k}", v, prog_bar=k in ("total", "ce", "mse", "dpo", "reward_acc"), batch_size=bs, sync_dist=False)
        self._tokens += item.batch.sequence_length
        self.log("train/tokens", float(item.batch.sequence_length), batch_size=bs, reduce_fx="sum")
        g0 = self.trainer.optimizers[0].param_groups[0]
        self.log("lr", g0["lr"] / g0.get("lr_scale", 1.0), batch_size=bs)  # the schedule's lr (lr_scale 1)
        return loss

    def validation_step(self, item, batch_idx):
        loss, logs = self.compute_losses(item)
        for k, v in logs.items():
            self.log(f"val/{k}", v, batch_size=item.num_samples, sync_dist=True)
        return loss

    def on_fit_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        pairs = getattr(dm, "preference", None)
        if dm is not None and bool(pairs) != (self.preference is not None):
            raise FtkitError("model.preference and data.preference go together: DPO needs the data as (chosen, "
                             "rejected) pairs, and pairs trained without it would teach the rejected reflections "
                             f"too (model.preference is {'set' if self.preference else 'null'}, data.preference "
                             f"{pairs!r})")
        if self.preference is not None and self.preference.reference == "init" and self._ref_logps is None:
            self._precompute_reference(dm)

    def on_train_batch_start(self, batch, batch_idx):
        if self._t0 is None:
            self._t0, self._tokens = time.perf_counter(), 0

    def on_train_batch_end(self, outputs, batch, batch_idx):
        dt = time.perf_counter() - self._t0
        if dt > 0:
            self.log("perf/tokens_per_s", self._tokens / dt, prog_bar=True, batch_size=1)
        self.log("perf/peak_mem_gb", peak_memory_gb(self.device), prog_bar=True, batch_size=1)
        self._t0, self._tokens = time.perf_counter(), 0

    # ------------------------------------------------------------------ optim
    def _lr_scales(self) -> dict[int, float]:
        """id(parameter) -> its ``lr_scale`` for the trainable parameters of the experts ``model.lr_scale`` names."""
        if not self.hparams.lr_scale:
            return {}
        from ftkit.adapters.config import EXPERT_SUFFIX
        from ftkit.models.experts import find_decoder, parameter_experts

        experts = find_decoder(self.model).experts
        by_suffix = {EXPERT_SUFFIX[k]: float(v) for k, v in self.hparams.lr_scale.items()}
        missing = [k for k in self.hparams.lr_scale if EXPERT_SUFFIX[k] not in experts]
        if missing:
            have = [k for k, s in EXPERT_SUFFIX.items() if s in experts]
            raise ValueError(f"model.lr_scale: this model has no {', '.join(missing)} expert (it has: {', '.join(have)})")
        owner = parameter_experts(self.model)
        out, counts = {}, {}
        for name, p in self.model.named_parameters():
            if p.requires_grad and owner[name] in by_suffix:
                out[id(p)] = by_suffix[owner[name]]
                counts[owner[name]] = counts.get(owner[name], 0) + p.numel()
        log.info("learning rate per expert: %s; everything else %.2e", ", ".join(
            f"{k} {self.hparams.lr * float(v):.2e} ({counts.get(EXPERT_SUFFIX[k], 0) / 1e6:.3f}M trainable)"
            for k, v in self.hparams.lr_scale.items()), self.hparams.lr)
        return out

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: the adapter preset matched no module")
        scale_of = self._lr_scales()
        groups: dict[tuple[float, bool], list] = {}
        for p in params:  # one group per (expert scale, weight decay or not)
            groups.setdefault((scale_of.get(id(p), 1.0), p.dim() >= 2), []).append(p)
        groups = [{"params": ps, "lr": hp.lr * scale, "lr_scale": scale, "weight_decay": hp.weight_decay if decay else 0.0}
                  for (scale, decay), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]
        # plain CPU tensors: the fused AdamW kernel (one call for all parameters instead of a Python loop of
        # ~10 ops per tensor, 2-3% of a tiny-model step); elsewhere torch's default (foreach on CUDA)
        fused = all(type(p) is torch.nn.Parameter and p.device.type == "cpu" for p in params) or None
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
        warm = min(hp.warmup_steps, max(total - 1, 0))

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            prog = min(1.0, (step - warm) / max(1, total - warm))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
