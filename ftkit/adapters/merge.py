"""Merge an adapter into a BAGEL release folder, streaming (peak RAM: one chunk + the adapter).

For a LoRA target with base weight ``W`` [out, in], ``A`` [r, in], ``B`` [out, r] and scale ``s``
(``alpha / r``; rsLoRA ``alpha / sqrt(r)``; per-module ``alpha`` / ``r`` from peft's
``alpha_pattern`` / ``rank_pattern``)::

    LoRA / rsLoRA:  W' = W + s B A
    DoRA:           V = W + s B A,   W' = (m / ||V||_row) * V

(:func:`~ftkit.adapters.merge_common.merged_weight`, peft's arithmetic; ``||V||_row``: L2 norm of each
output row over the input dimension; ``m`` [out] the learned magnitude). Both are row-local, so
:func:`merge` computes ``W'`` a block of rows at a time in fp32 (peft's ``get_delta_weight`` is a method of a
built peft layer and returns the whole ``[out, in]`` delta; the streaming merge never builds the model)
and casts to the output dtype; biases are unchanged (peft's DoRA does not rescale the bias either).
Trained ``modules_to_save`` replace their base tensors. Adapters trained on a three-expert model
(``_moe_sem`` upcycled from the understanding expert) produce a three-expert checkpoint: each
``*_moe_sem*`` tensor starts from its understanding twin.

Files are read with plain positioned reads (no memory map, so no file pages count against the
process) and written by a streaming safetensors writer (header computed up front from the base's
header, then each tensor's bytes in order). Output goes to a temporary sibling folder that is renamed
to ``out`` only after everything (verification included) succeeded.

Output folder: ``llm_config.json``, ``vit_config.json``, ``ae.safetensors`` (+ ``ae_config.json``),
tokenizer files, the weights -- one ``ema.safetensors`` (the release's own layout) when it fits in
``max_shard_size`` (or ``max_shard_size=None``), else ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` ({"metadata": {"total_size"}, "weight_map": {tensor: shard}}) -- and
a model card ``README.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from ftkit.adapters.io import FTKIT_META, AdapterError, AdapterFolder, architecture_dict, split_disk_key
from ftkit.adapters.merge_common import (
    FOUR_BIT_EXPLANATION,
    MergeError,
    MergeReport,
    adapter_method,
    check_finite,
    check_merge_args,
    compare_outputs,
    human_bytes,
    merge_into_model,
    merged_weight,
    model_card,
    probe_batch,
    record_verification,
    require_free_space,
    run_probe,
    verification_text,
    write_errors,
)
from ftkit.models.folders import SAMPLING_FILE, SHARD_INDEX, ST_DTYPES, ST_TAGS, model_sampling

WEIGHTS = "ema.safetensors"
INDEX = SHARD_INDEX
CONFIG_FILES = ("llm_config.json", "vit_config.json")
OPTIONAL_FILES = ("ae.safetensors", "ae_config.json", "ftkit_bagel.json", "vocab.json", "merges.txt",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "generation_config.json")
CHUNK_BYTES = 64 << 20  # fp32 working block of a merge / copy
QUANTIZED_KEY = re.compile(r"\.(absmax|quant_map|nested_absmax|nested_quant_map|SCB|weight_format)$|quant_state")


def parse_size(size: int | str | None) -> int | None:
    """``"5GB"`` -> 5e9, ``"500MiB"`` -> 500 * 2**20, ``1234`` -> 1234, ``None`` / ``"none"`` -> None."""
    if size is None or isinstance(size, int):
        if isinstance(size, int) and size <= 0:
            raise ValueError(f"max_shard_size must be positive, got {size}")
        return size
    s = str(size).strip()
    if s.lower() in ("none", "0", ""):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", s, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected e.g. 5GB, 500MB, 2GiB or a byte count")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


# ----------------------------------------------------------------------------- reading (no mmap)

@dataclass
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint:
    """The weights of a release folder: ``ema.safetensors`` or shards listed in ``model.safetensors.index.json``,
    read through the loader's plain-read safetensors readers (:func:`ftkit.models.loading.open_weights`).

    ``infos`` maps tensor name -> :class:`TensorInfo`; :meth:`read` / :meth:`read_rows` /
    :meth:`read_elements` read a whole tensor, a block of rows or a run of elements into fresh tensors
    (positioned reads, no memory map).

    Raises:
        FileNotFoundError: neither file is there; MergeError: a corrupt or truncated file / index (named).
    """

    def __init__(self, folder: str | Path):
        from ftkit.models.loading import CheckpointError, open_weights, release_weights

        self.folder = Path(folder)
        path = release_weights(self.folder)
        if path is None:
            raise FileNotFoundError(f"{self.folder}: no {WEIGHTS} and no {INDEX} (not a BAGEL release folder)")
        try:
            self._st = open_weights(path)
        except CheckpointError as e:
            raise MergeError(str(e)) from e
        unsupported = sorted(k for k in self._st.keys() if self._st.dtype(k) not in ST_TAGS)
        if unsupported:
            raise MergeError(f"{path}: tensor {unsupported[0]} has dtype {self._st.dtype(unsupported[0])}, "
                             f"not supported by ftkit merge ({', '.join(ST_DTYPES)})")
        self.infos = {k: TensorInfo(self._st.dtype(k), self._st.shape(k)) for k in self._st.keys()}
        self.files = self._st.files

    def close(self) -> None:
        self._st.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def read_elements(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of tensor ``name`` (flattened), as a new 1-D tensor."""
        return self._st.read_elements(name, start, count)

    def read(self, name: str) -> torch.Tensor:
        info = self.infos[name]
        return self.read_elements(name, 0, info.numel).reshape(info.shape)

    def read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        info = self.infos[name]
        row = math.prod(info.shape[1:])
        return self.read_elements(name, r0 * row, (r1 - r0) * row).reshape(r1 - r0, *info.shape[1:])


# ----------------------------------------------------------------------------- writing

class StreamingSafetensorsWriter:
    """Write one safetensors file whose tensors (names, dtypes, shapes, in order) are known up front.

    The header is written on construction; :meth:`write` appends bytes of the current tensor; the
    writer checks that each tensor received exactly its byte count. Layout: u64 little-endian header
    length, JSON header space-padded to a multiple of 8, then the data in header order.
    """

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header, off = {}, 0
        self.sizes = []
        for name, dt, shape in entries:
            nb = math.prod(shape) * dt.itemsize
            header[name] = {"dtype": ST_TAGS[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
            self.sizes.append((name, nb))
            off += nb
        if metadata:
            header["__metadata__"] = metadata
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self.size = 8 + len(hb) + off
        self.fh = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self.fh.write(len(hb).to_bytes(8, "little"))
        self.fh.write(hb)
        self._i, self._got = 0, 0

    def write(self, t: torch.Tensor) -> None:
        b = t.contiguous().reshape(-1)
        arr = b.view(torch.uint8).numpy() if b.dtype != torch.bool else b.numpy().view("u1")
        self.fh.write(memoryview(arr))
        self._got += arr.nbytes
        name, nb = self.sizes[self._i]
        if self._got > nb:
            raise MergeError(f"{self.path}: {self._got} bytes written for {name}, expected {nb}")
        if self._got == nb:
            self._i, self._got = self._i + 1, 0

    def close(self) -> None:
        if self._i != len(self.sizes) and not (self._i == len(self.sizes) - 1 and self.sizes[-1][1] == 0):
            raise MergeError(f"{self.path}: only {self._i} of {len(self.sizes)} tensors written")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()

    def abort(self) -> None:
        self.fh.close()


# ----------------------------------------------------------------------------- the merge plan

@dataclass
class LoraDelta:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float
    magnitude: torch.Tensor | None = None  # [out] (DoRA)


@dataclass
class OutTensor:
    name: str
    source: str  # tensor name in the base checkpoint
    dtype: torch.dtype
    shape: tuple[int, ...]
    lora: LoraDelta | None = None
    replace: torch.Tensor | None = None  # modules_to_save

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _pattern_value(patterns: dict, name: str, default):
    """peft's lookup (``get_pattern_key``): the first key with ``re.match(r"(.*\\.)?(KEY)$", name)``."""
    for key, v in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return v
    return default


def lora_scale(peft_cfg: dict, module: str, r: int) -> float:
    """``alpha / r`` (``alpha / sqrt(r)`` with use_rslora), alpha from ``alpha_pattern`` or ``lora_alpha``."""
    alpha = _pattern_value(peft_cfg.get("alpha_pattern"), module, peft_cfg.get("lora_alpha", 8))
    return float(alpha) / (math.sqrt(r) if peft_cfg.get("use_rslora") else r)


def _base_arch(base: Path, infos: dict[str, TensorInfo]) -> dict:
    from ftkit.models.config import BagelConfig, LLMConfig, ViTConfig

    llm = LLMConfig.from_json(base / "llm_config.json")
    vit = ViTConfig.from_json(base / "vit_config.json")
    kw = {}
    for key, fld in (("latent_pos_embed.pos_embed", "max_latent_size"),
                     ("vit_pos_embed.pos_embed", "vit_max_num_patch_per_side")):
        if key in infos:
            kw[fld] = math.isqrt(infos[key].shape[0])
    if "vae2llm.weight" in infos:
        kw["latent_channels"] = infos["vae2llm.weight"].shape[1] // 4
    return architecture_dict(SimpleNamespace(cfg=BagelConfig(llm=llm, vit=vit, **kw)))


def _experts_of(keys) -> list[str]:
    ex = [""]
    for s in ("_moe_sem", "_moe_gen"):
        if any(s in k for k in keys):
            ex.append(s)
    return ex


def plan_merge(base: Path, ckpt: Checkpoint, ad: AdapterFolder, dtype: torch.dtype) -> tuple[list[OutTensor], dict]:
    """Validate base + adapter and list every output tensor with its source and operation.

    Raises:
        MergeError: 4-bit base weights; AdapterError: adapter for another base (names / shapes / experts /
        architecture), malformed adapter tensors.
    """
    infos = ckpt.infos
    quant = sorted(k for k in infos if QUANTIZED_KEY.search(k))
    if quant:
        raise MergeError(f"{base}: these weights are quantized (e.g. {quant[0]}). {FOUR_BIT_EXPLANATION}")
    peft_cfg = ad.peft
    if peft_cfg.get("lora_bias") or peft_cfg.get("bias", "none") != "none" or peft_cfg.get("fan_in_fan_out"):
        raise AdapterError(f"{ad.path / 'adapter_config.json'}: lora_bias / bias / fan_in_fan_out adapters "
                           "are not supported by ftkit merge")
    # experts: a three-expert adapter on a two-expert release upcycles _moe_sem from the base expert
    base_experts = _experts_of(infos)
    ad_experts = ad.experts or base_experts
    upcycle = "_moe_sem" in ad_experts and "_moe_sem" not in base_experts
    if sorted(set(ad_experts)) != sorted(set(base_experts) | ({"_moe_sem"} if upcycle else set())):
        raise AdapterError(f"{ad.path / FTKIT_META}: adapter trained on experts {ad_experts}, the base "
                           f"{ckpt.files[0]} has {base_experts}")
    diffs = []
    fp_arch = ad.fingerprint.get("arch") or {}
    if fp_arch:
        from ftkit.adapters.io import _arch_diff

        diffs = _arch_diff(fp_arch, _base_arch(base, infos))
    if diffs:
        raise AdapterError(f"{ad.path / FTKIT_META}: adapter trained for another base architecture than {base}: "
                           + "; ".join(diffs[:8]))
    sources: dict[str, str] = {k: k for k in infos}
    if upcycle:
        for k in list(infos):
            if k.startswith("language_model.model.") and "_moe_gen" in k:
                src = k.replace("_moe_gen", "")
                if src not in infos:
                    raise MergeError(f"{ckpt.files[0]}: cannot upcycle {k.replace('_moe_gen', '_moe_sem')}: "
                                     f"no {src}")
                sources[k.replace("_moe_gen", "_moe_sem")] = src
    # adapter tensors grouped by module
    groups: dict[str, dict[str, torch.Tensor]] = {}
    replace: dict[str, torch.Tensor] = {}
    for key, t in ad.tensors().items():
        mod, part = split_disk_key(key)
        if part == "param":
            replace[mod] = t
        else:
            groups.setdefault(mod, {})[part] = t
    actual = {}
    for n in ad.targets:
        w = sources.get(n + ".weight")
        actual[n] = tuple(infos[w].shape) if w is not None else None
    ad.check_shapes(actual, f"the base {base}", set(groups) - set(ad.targets))
    no_tensors = sorted(set(ad.targets) - set(groups))
    if no_tensors:
        raise AdapterError(f"{ad.weights_path}: no LoRA tensors for targets {no_tensors[:6]}")
    dora = bool(peft_cfg.get("use_dora"))
    deltas: dict[str, LoraDelta] = {}
    for mod, parts in sorted(groups.items()):
        need = {"A", "B"} | ({"magnitude"} if dora else set())
        if set(parts) != need:
            raise AdapterError(f"{ad.weights_path}: module {mod} has tensors {sorted(parts)}, expected {sorted(need)}")
        A, B = parts["A"], parts["B"]
        out_f, in_f = actual[mod]
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or B.shape != (out_f, r):
            raise AdapterError(f"{ad.weights_path}: {mod}: A {list(A.shape)} / B {list(B.shape)} do not fit the base "
                               f"weight [{out_f}, {in_f}]")
        r_cfg = _pattern_value(peft_cfg.get("rank_pattern"), mod, peft_cfg.get("r"))
        if r_cfg is not None and int(r_cfg) != r:
            raise AdapterError(f"{ad.weights_path}: {mod}: rank {r} in the tensors, {r_cfg} in adapter_config.json")
        mag = parts.get("magnitude")
        if mag is not None and tuple(mag.shape) != (out_f,):
            raise AdapterError(f"{ad.weights_path}: {mod}: magnitude {list(mag.shape)}, expected [{out_f}]")
        deltas[mod + ".weight"] = LoraDelta(A.float(), B.float(), lora_scale(peft_cfg, mod, r),
                                            None if mag is None else mag.float())
    for k, t in replace.items():
        if k not in sources:
            raise AdapterError(f"{ad.weights_path}: modules_to_save tensor {k} has no counterpart in the base")
        shp = infos[sources[k]].shape
        if tuple(t.shape) != tuple(shp):
            raise AdapterError(f"{ad.weights_path}: modules_to_save tensor {k} {list(t.shape)}, base {list(shp)}")
    plan = []
    for name, src in sources.items():
        info = infos[src]
        out_dt = dtype if info.dtype.is_floating_point else info.dtype
        plan.append(OutTensor(name, src, out_dt, info.shape, deltas.get(name), replace.get(name)))
    plan.sort(key=lambda o: (-o.dtype.itemsize, o.name))  # keeps every tensor aligned to its element size
    stats = {"merged": len(deltas), "replaced": len(replace), "upcycled": len(sources) - len(infos),
             "method": adapter_method(peft_cfg),
             "three_experts": "_moe_sem" in ad_experts}
    return plan, stats


def produce(ckpt: Checkpoint, o: OutTensor, chunk_bytes: int = CHUNK_BYTES):
    """Yield the output tensor ``o`` in blocks (rows for merged weights, elements otherwise)."""
    if o.replace is not None:
        yield check_finite(o.name, o.replace.to(o.dtype))
        return
    info = ckpt.infos[o.source]
    if o.lora is None:
        step = max(1, chunk_bytes // max(4, info.dtype.itemsize))
        for s in range(0, info.numel, step):
            x = ckpt.read_elements(o.source, s, min(step, info.numel - s))
            yield x if x.dtype == o.dtype else x.to(o.dtype)
        return
    out_f, in_f = info.shape
    d = o.lora
    rows = max(1, chunk_bytes // (4 * in_f))
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        w = merged_weight(ckpt.read_rows(o.source, r0, r1).float(), d.A, d.B[r0:r1], d.scale,
                          None if d.magnitude is None else d.magnitude[r0:r1])
        yield check_finite(o.name, w.to(o.dtype))


def shard_plan(plan: list[OutTensor], max_bytes: int | None) -> list[list[OutTensor]]:
    """Greedy shards of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    if max_bytes is None:
        return [plan]
    shards, cur, size = [], [], 0
    for o in plan:
        if cur and size + o.nbytes > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(o)
        size += o.nbytes
    if cur:
        shards.append(cur)
    return shards


# ----------------------------------------------------------------------------- verification

def verify_merge(base: Path, adapter: Path, merged: Path, three_experts: bool) -> dict:
    """Max |difference| between base + adapter (fp32, peft layers) and the merged folder (fp32) on
    :func:`probe_batch` (final hidden states, CE logits, velocity predictions). Loads one model at a
    time. ``max_scaled_diff`` divides each output's difference by its largest magnitude when that
    exceeds 1 (bf16 rounding of merged weights is relative: logits of size 30 differ ~30x more than
    normalised hidden states)."""
    from ftkit.adapters.io import load_adapter
    from ftkit.models.loading import load_bagel

    ref_model = load_bagel(base, dtype=torch.float32, three_experts=three_experts)
    load_adapter(ref_model, adapter)
    probe = probe_batch(ref_model.cfg)
    ref = run_probe(ref_model, probe)
    del ref_model
    model = load_bagel(merged, dtype=torch.float32)  # ema.safetensors or the sharded index
    return {**compare_outputs(ref, run_probe(model, probe)), "probe_tokens": probe[0].sequence_length}


# ----------------------------------------------------------------------------- merge

def _require_config_files(base: Path) -> None:
    absent = [f for f in CONFIG_FILES if not (base / f).is_file()]
    if absent:
        raise FileNotFoundError(f"{base}: missing {', '.join(absent)} (not a BAGEL release folder)")


def _model_card(base: Path, adapter: Path, ad: AdapterFolder, rep: MergeReport, dtype: torch.dtype) -> str:
    rows = [f"| weights | {str(dtype).removeprefix('torch.')} ({'sharded, ' + INDEX if rep.sharded else WEIGHTS}) |"]
    if rep.upcycled:
        rows.append(f"| experts | three (the `_moe_sem` expert, {rep.upcycled} tensors, starts from the understanding "
                    "expert and carries its trained adapter) |")
    loading = ["ftkit: `ftkit.models.loading.load_bagel(PATH)` or `ftkit generate --model PATH` "
               "(reads `ema.safetensors` or the sharded index).",
               "Upstream BAGEL: point its loader at this folder " + (
                   f"(`load_checkpoint_and_dispatch(model, checkpoint=PATH)` reads `{INDEX}`)." if rep.sharded else
                   f"(`{WEIGHTS}`, as the release).")]
    return model_card("BAGEL", f"`{base}`", adapter, ad, rep, rows, loading)


def merge(base: str | Path, adapter: str | Path, out: str | Path, *, dtype: torch.dtype | str = torch.bfloat16,
          max_shard_size: int | str | None = None, overwrite: bool = False, verify: bool = True,
          tolerance: float | None = None, progress: bool = False) -> MergeReport:
    """Merge ``adapter`` into the BAGEL release folder ``base`` and write a release folder ``out``.

    Streaming: the base is never loaded whole; every tensor is read, merged (fp32) and written in
    blocks of at most 64 MiB of fp32 (see module doc for the math and the folder layout).

    Args:
        base: the UNQUANTIZED release folder the adapter was trained on (also for QLoRA adapters).
        adapter: an adapter folder written by :func:`ftkit.adapters.io.save_adapter`.
        out: output folder (written to a temporary sibling, renamed at the end).
        dtype: floating dtype of the written weights (``torch.bfloat16`` as the release, or ``"fp32"``...).
        max_shard_size: ``"5GB"``-style limit per shard; when everything fits one shard (or ``None``),
            one ``ema.safetensors`` is written, else shards + ``model.safetensors.index.json``.
        overwrite: replace an existing ``out``.
        verify: after writing, compare base + adapter with the merged folder on a probe batch (loads
            the model twice, one after the other, in fp32) and fail when the max abs difference, divided
            by the output's largest magnitude where that exceeds 1, is above ``tolerance`` (default 1e-4
            for fp32 output, 2e-2 for bf16/fp16).
        progress: show a tqdm bar over tensors.

    Raises:
        TypeError: ``base`` is a model (use :func:`merge_into_model`).
        FileNotFoundError: a folder or file is missing. FileExistsError: ``out`` exists.
        AdapterError: adapter for another base (names, shapes, experts, architecture) or malformed.
        MergeError: quantized base weights; verification above tolerance.
        OSError: writing failed (e.g. disk full); nothing is left under ``out``.
    """
    from tqdm.auto import tqdm

    from ftkit.models.release import atomic_dir

    t0 = time.perf_counter()
    max_bytes = parse_size(max_shard_size)
    base, adapter, out, dtype, ad = check_merge_args("merge() takes the base release FOLDER (streaming)", base,
                                                     adapter, out, dtype, overwrite, _require_config_files)
    with Checkpoint(base) as ckpt:
        plan, stats = plan_merge(base, ckpt, ad, dtype)
        total = sum(o.nbytes for o in plan)
        shards = shard_plan(plan, max_bytes if max_bytes is not None and total > max_bytes else None)
        sharded = len(shards) > 1
        names = [WEIGHTS] if not sharded else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                               for i in range(len(shards))]
        copies = [f for f in OPTIONAL_FILES if (base / f).is_file()] + list(CONFIG_FILES)
        sampling = model_sampling(base, adapter)  # the adapter's sampling.json over the base's (both validated)
        need = total + sum((base / f).stat().st_size for f in copies) + (1 << 20) * len(shards)
        require_free_space(out, need)
        rep = MergeReport(out=out, files=[], tensors=len(plan), merged=stats["merged"], replaced=stats["replaced"],
                          upcycled=stats["upcycled"], total_bytes=total, sharded=sharded, method=stats["method"])
        with atomic_dir(out, overwrite, inputs=(base, adapter), model_folder=True) as tmp:
            with write_errors(out), tqdm(total=len(plan), unit="tensor", desc="merge", disable=not progress) as bar:
                for fname, shard in zip(names, shards):
                    w = StreamingSafetensorsWriter(tmp / fname, [(o.name, o.dtype, o.shape) for o in shard],
                                                   {"format": "pt"})
                    try:
                        for o in shard:
                            for block in produce(ckpt, o):
                                w.write(block)
                            bar.update(1)
                    except BaseException:
                        w.abort()
                        raise
                    w.close()
                    rep.files.append(fname)
                if sharded:
                    index = {"metadata": {"total_size": total},
                             "weight_map": {o.name: f for f, shard in zip(names, shards) for o in shard}}
                    (tmp / INDEX).write_text(json.dumps(index, indent=2))
                    rep.files.append(INDEX)
                for f in copies:
                    shutil.copy2(base / f, tmp / f)
                    rep.files.append(f)
                if sampling:
                    (tmp / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2))
                    rep.files.append(SAMPLING_FILE)
                if stats["upcycled"] and (tmp / "ftkit_bagel.json").is_file():
                    d = json.loads((tmp / "ftkit_bagel.json").read_text())
                    d.update(experts=["", "_moe_sem", "_moe_gen"], routing=[0, 1, 2])
                    (tmp / "ftkit_bagel.json").write_text(json.dumps(d, indent=2))
            if verify:
                record_verification(rep, verify_merge(base, adapter, tmp, stats["three_experts"]), tolerance, dtype,
                                    out)
            (tmp / "README.md").write_text(_model_card(base, adapter, ad, rep, dtype))
            rep.files.append("README.md")
    rep.seconds = time.perf_counter() - t0
    return rep


# merge_into_model, MergeError, MergeReport, probe_batch, run_probe, human_bytes, verification_text and
# FOUR_BIT_EXPLANATION live in merge_common; they stay importable from here, their home before it.
__all__ = ["merge", "merge_into_model", "MergeError", "MergeReport", "Checkpoint", "StreamingSafetensorsWriter",
           "verify_merge", "probe_batch", "run_probe", "parse_size", "lora_scale", "FOUR_BIT_EXPLANATION",
           "human_bytes", "verification_text"]
