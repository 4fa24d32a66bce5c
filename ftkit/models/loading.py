"""Load a BAGEL release folder as it is downloaded (no conversion step).

The model is built on the meta device; every parameter is then read from the safetensors file with
plain file reads *straight into the storage of its final tensor* (cast chunk by chunk when the
target dtype differs, or staged through a small buffer when the target is a GPU), optionally
quantized, and assigned one tensor at a time. No memory map is used: with ``safe_open`` every page
of the file that was touched stays resident in the process (and ``get_tensor`` copies out of it),
which puts peak RSS at twice the model's size. With plain reads peak RSS stays close to the final
model's own bytes (bench/bench_load.py measures it). Every key is accounted for: missing,
unexpected or mis-shaped keys, and a file cut short, raise :class:`CheckpointError` naming the file
and the keys; nothing is left randomly initialised (a parameter still on the meta device raises).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ftkit.errors import FtkitError
from ftkit.models.bagel import BagelModel
from ftkit.models.config import BagelConfig, LLMConfig, ViTConfig
from ftkit.models.folders import SHARD_INDEX, ST_DTYPES, ST_TAGS, bagel_release_config  # noqa: F401 (ST_TAGS re-exported)

log = logging.getLogger("ftkit")

RELEASE_FILES = ("llm_config.json", "vit_config.json", "ema.safetensors")
WEIGHTS_HINT = (
    "BAGEL-7B-MoT is published on the Hugging Face Hub as ByteDance-Seed/BAGEL-7B-MoT; download the folder "
    "(e.g. `huggingface-cli download ByteDance-Seed/BAGEL-7B-MoT --local-dir PATH` on a machine with network) "
    "and pass its local path."
)
QUANTIZE = (None, "nf4", "int8")

_PIECE = 16 << 20  # bytes per positional read (and per staging buffer when casting)
_READERS = 4 if hasattr(os, "preadv") else 1  # reader threads: page faults and copies overlap on 2+ cores
_NF4_ROWS_BYTES = 8 << 20  # a decoder weight is read and quantized in row blocks of about this size
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class CheckpointError(FtkitError, ValueError):
    """A checkpoint that does not match the model it should fill."""


def _fmt_keys(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


class SafetensorsFile:
    """A safetensors file read with plain file reads (no memory map).

    Layout: ``u64 n`` (little endian), ``n`` bytes of JSON header ``{name: {dtype, shape, data_offsets:
    [begin, end]}, "__metadata__": {...}}``, then the data section; a tensor's bytes lie at
    ``8 + n + begin .. 8 + n + end``, C order, little endian.

    The constructor validates the whole header against the file size, so a truncated file is refused
    before anything is read. Reading (:meth:`read`, :meth:`iter_rows`) opens the file and a few reader
    threads on first use; use the object as a context manager (or call :meth:`close`) to release them.

    Args:
        path: the ``.safetensors`` file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: corrupt header, unknown dtype, a tensor whose byte length does not match its
            shape, or data past the end of the file (truncated; the message names the keys affected).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        self.size = size
        bad = f"{self.path}: cannot read safetensors file ({size} bytes)"
        with open(self.path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{bad}: no header; the file is truncated or corrupt, download it again")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{bad}: header claims {n} bytes; the file is truncated or corrupt, "
                                      "download it again")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{bad}: header is not JSON ({e}); the file is corrupt, download it again") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{bad}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for k, v in header.items():
            try:
                dt = ST_DTYPES[v["dtype"]]
                shape = tuple(int(d) for d in v["shape"])
                b, e = (int(x) for x in v["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise CheckpointError(f"{self.path}: header entry of key {k} is malformed ({v!r})") from err
            nbytes = math.prod(shape) * dt.itemsize
            if e - b != nbytes or b < 0:
                raise CheckpointError(f"{self.path}: key {k}: data_offsets {[b, e]} do not hold a {v['dtype']} "
                                      f"tensor of shape {list(shape)} ({nbytes} bytes)")
            self.entries[k] = (dt, shape, self.data_start + b, nbytes)
        end = max((o + nb for _, _, o, nb in self.entries.values()), default=self.data_start)
        if size < end:
            cut = [k for k, (_, _, o, nb) in self.entries.items() if o + nb > size]
            raise CheckpointError(f"{self.path}: truncated: {size} bytes on disk, header describes {end}; data of "
                                  f"{len(cut)} key(s) lies past the end of the file: {_fmt_keys(cut)}; "
                                  "download it again")

    def keys(self) -> list[str]:
        return list(self.entries)

    def file_of(self, key: str) -> Path:
        return self.path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self.entries[key][0]

    def offset(self, key: str) -> int:
        """Absolute byte offset of ``key``'s data in the file."""
        return self.entries[key][2]

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def read_elements(self, key: str, start: int, count: int) -> torch.Tensor:
        """Elements ``start .. start + count`` of ``key`` (flattened, C order) as a new 1-D tensor."""
        out = torch.empty(count, dtype=self.dtype(key))
        self._fill(key, out, start)
        return out

    # ------------------------------------------------------------------ reading
    def __enter__(self) -> SafetensorsFile:
        self._open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        if getattr(self, "_fd", None) is None:
            self._fh = open(self.path, "rb", buffering=0)
            self._fd = self._fh.fileno()
            self._pool = ThreadPoolExecutor(_READERS) if _READERS > 1 else None

    def close(self) -> None:
        """Close the file descriptor and the reader threads (reopened on the next read)."""
        if getattr(self, "_fd", None) is not None:
            self._fh.close()
            self._fd = None
            if self._pool is not None:
                self._pool.shutdown()
            self._pool = None

    def _pread(self, key: str, buf: memoryview, pos: int) -> None:
        got = 0
        while got < len(buf):
            if _READERS > 1:
                k = os.preadv(self._fd, [buf[got:]], pos + got)
            else:  # no positional reads on this platform: one reader thread, seek + readinto
                self._fh.seek(pos + got)
                k = self._fh.readinto(buf[got:])
            if not k:
                raise CheckpointError(f"{self.path}: truncated while reading key {key} (file changed on disk?)")
            got += k

    def _fill(self, key: str, out: torch.Tensor, first: int = 0) -> None:
        """Read elements ``first .. first + out.numel()`` of ``key`` (C order) into contiguous ``out``.

        ``out`` on CPU with the file's dtype: the bytes go straight into its storage. Otherwise each
        piece passes through a staging buffer (at most ``_PIECE`` bytes) and ``copy_`` casts / moves it.
        Pieces are read by ``_READERS`` threads with positional reads (``os.preadv``).
        """
        self._open()
        fdt, _, pos, _ = self.entries[key]
        n, size = out.numel(), fdt.itemsize
        if n == 0:
            return
        pos += first * size
        per = max(1, _PIECE // size)
        direct = out.dtype == fdt and out.device.type == "cpu"
        dest = out.reshape(-1)
        raw = memoryview(dest.view(torch.uint8).numpy()) if direct else None

        def piece(i: int) -> None:
            m = min(per, n - i)
            if direct:
                self._pread(key, raw[i * size:(i + m) * size], pos + i * size)
            else:
                stage = torch.empty(m * size, dtype=torch.uint8)
                self._pread(key, memoryview(stage.numpy()), pos + i * size)
                dest[i:i + m].copy_(stage.view(fdt))

        starts = range(0, n, per)
        if self._pool is None or len(starts) == 1:
            for i in starts:
                piece(i)
        else:
            for f in [self._pool.submit(piece, i) for i in starts]:
                f.result()

    def read(self, key: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read ``key`` into a new tensor of ``dtype`` (default: the file's) on ``device``.

        Same dtype on CPU: the file's bytes are read straight into the new tensor, no other copy.
        Otherwise pieces of at most 16 MiB are staged and cast / moved one by one.
        """
        fdt, shape, _, _ = self.entries[key]
        out = torch.empty(shape, dtype=dtype or fdt, device=device)
        self._fill(key, out)
        return out

    def iter_rows(self, key: str, rows: int, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """Yield ``(row_start, tensor)`` for consecutive blocks of ``rows`` rows (dim 0) of ``key``."""
        fdt, shape, _, _ = self.entries[key]
        width = math.prod(shape[1:])
        for r in range(0, shape[0], rows):
            out = torch.empty((min(rows, shape[0] - r), *shape[1:]), dtype=dtype or fdt, device=device)
            self._fill(key, out, r * width)
            yield r, out


INDEX_FILE = SHARD_INDEX


class ShardedSafetensors:
    """Several safetensors shards behind a ``model.safetensors.index.json`` (``{"weight_map": {key:
    shard}}``, what ``ftkit merge --max-shard-size`` and transformers write), with the interface of
    :class:`SafetensorsFile`. Offsets are ``(shard number, offset)`` so reads stay in file order.

    Raises:
        FileNotFoundError: the index or a shard it names is missing.
        CheckpointError: the index is not valid JSON / has no weight_map, or a key listed in the index
            is absent from its shard (names the shard and the keys).
    """

    def __init__(self, index: str | os.PathLike):
        self.path = Path(index)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: file not found")
        try:
            wmap = json.loads(self.path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.path}: not a safetensors index (needs a 'weight_map'): {e}") from e
        names = sorted(set(wmap.values()))
        self.shards = [SafetensorsFile(self.path.parent / n) for n in names]
        by_name = dict(zip(names, self.shards))
        self.where: dict[str, tuple[int, SafetensorsFile]] = {}
        for k, n in wmap.items():
            shard = by_name[n]
            if k not in shard.entries:
                raise CheckpointError(f"{self.path}: key {k} is listed for {n} but that shard does not hold it")
            self.where[k] = (names.index(n), shard)
        extra = [k for i, sh in enumerate(self.shards) for k in sh.keys() if k not in self.where]
        if extra:
            raise CheckpointError(f"{self.path}: shards hold keys the index does not list: {_fmt_keys(extra)}")

    def keys(self) -> list[str]:
        return list(self.where)

    def file_of(self, key: str) -> Path:
        return self.where[key][1].path

    def shape(self, key: str) -> tuple[int, ...]:
        return self.where[key][1].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.where[key][1].dtype(key)

    def offset(self, key: str) -> tuple[int, int]:
        i, sh = self.where[key]
        return (i, sh.offset(key))

    def read(self, key: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        return self.where[key][1].read(key, dtype, device)

    def iter_rows(self, key: str, rows: int, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        return self.where[key][1].iter_rows(key, rows, dtype, device)

    def read_elements(self, key: str, start: int, count: int) -> torch.Tensor:
        return self.where[key][1].read_elements(key, start, count)

    @property
    def files(self) -> list[Path]:
        return [sh.path for sh in self.shards]

    def close(self) -> None:
        for sh in self.shards:
            sh.close()

    def __enter__(self) -> ShardedSafetensors:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_weights(path: str | os.PathLike) -> SafetensorsFile | ShardedSafetensors:
    """A single ``.safetensors`` file, or the shards of a ``*.index.json``."""
    path = Path(path)
    return ShardedSafetensors(path) if path.name.endswith(".index.json") else SafetensorsFile(path)


def release_weights(folder: Path) -> Path | None:
    """The weights of a BAGEL folder: ``ema.safetensors`` (the release) or a sharded index (a merge)."""
    for name in ("ema.safetensors", INDEX_FILE):
        if (folder / name).is_file():
            return folder / name
    return None


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=requires_grad and tensor.is_floating_point())
    elif attr in mod._buffers:
        mod._buffers[attr] = tensor
    else:
        raise KeyError(name)


def is_quantizable(name: str) -> bool:
    """Decoder Linear layers of every expert (attention projections and MLPs)."""
    return ".layers." in name and name.startswith("language_model.") and name.endswith(".weight") and (
        "_proj" in name.rsplit(".", 2)[-2]
    )


def nf4_quantize_rows(blocks: Iterable[tuple[int, torch.Tensor]], shape: tuple[int, int], dtype: torch.dtype,
                      blocksize: int = 64):
    """NF4-quantize a weight given as row blocks; bit-identical to ``Params4bit(w)._quantize("cpu")``.

    bitsandbytes quantizes the flattened weight in independent blocks of ``blocksize`` values
    (``q = nf4_code(x / absmax_block)``, two codes per byte), so row blocks whose element counts are
    multiples of ``blocksize`` quantize independently; the double quantization of the absmax vector
    (``offset = mean(absmax)``, 8-bit blockwise over ``absmax - offset`` in blocks of 256) is done once
    on the whole vector, as ``compress_statistics=True`` does. Only one row block is ever held in
    ``dtype``, so host RAM stays near the packed size.

    Args:
        blocks: ``(row_start, rows)`` in order covering all rows; every block but the last must hold a
            multiple of ``blocksize`` elements.
        shape: ``(out_features, in_features)``.
        dtype: the weight's compute dtype (recorded in the quantization state for dequantization).

    Returns:
        ``bnb.nn.Params4bit`` (CPU, frozen) with its ``QuantState``.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    n = shape[0] * shape[1]
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    for r, w in blocks:
        e0 = r * shape[1]
        if e0 % blocksize:
            raise ValueError(f"row block at row {r} does not start on a {blocksize}-element quantization block")
        q, st = F.quantize_4bit(w.to(dtype), blocksize=blocksize, compress_statistics=False, quant_type="nf4",
                                quant_storage=torch.uint8)
        packed[e0 // 2:e0 // 2 + q.shape[0]] = q
        absmax[e0 // blocksize:e0 // blocksize + st.absmax.numel()] = st.absmax
        del q, st, w
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
    state = F.QuantState(absmax=qabsmax, shape=torch.Size(shape), dtype=dtype, blocksize=blocksize,
                         code=F.get_4bit_type("nf4", device=packed.device), quant_type="nf4", offset=offset,
                         state2=state2)
    return bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                             compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8,
                             bnb_quantized=True)


def nf4_rows_per_block(shape: tuple[int, int], itemsize: int, budget: int | None = None,
                       blocksize: int = 64) -> int:
    """Rows per block for :func:`nf4_quantize_rows`: about ``budget`` bytes (default ``_NF4_ROWS_BYTES``)
    and a multiple of ``blocksize`` values."""
    budget = _NF4_ROWS_BYTES if budget is None else budget
    g = blocksize // math.gcd(shape[1], blocksize)
    return max(g, budget // max(1, shape[1] * itemsize) // g * g)


def _quantized_linear(w, bias: torch.Tensor | None, mode: str, dtype: torch.dtype, device,
                      shape: tuple[int, int] | None = None) -> nn.Module:
    """A bitsandbytes layer holding ``w``: a tensor, or (nf4 on CPU) an iterable of ``(row_start, rows)``
    blocks of a weight of ``shape``, quantized block by block (:func:`nf4_quantize_rows`)."""
    import bitsandbytes as bnb

    out_f, in_f = shape if shape is not None else w.shape
    if mode == "nf4":
        lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=dtype, quant_type="nf4",
                                quant_storage=torch.uint8, device="meta")
        if isinstance(w, torch.Tensor):
            lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, quant_type="nf4",
                                           compress_statistics=True, quant_storage=torch.uint8)._quantize(device)
        else:
            if torch.device(device).type != "cpu":
                raise ValueError("row-block NF4 quantization runs on CPU; pass the whole weight for other devices")
            lin.weight = nf4_quantize_rows(w, (out_f, in_f), dtype)
        # bnb's CPU path repacks 4-bit weights after an eval no-grad forward, which breaks later training
        # forwards; keep the portable kernel (no effect on CUDA).
        lin.support_avx512bf16_for_cpu = False
    else:
        lin = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, device="meta")
        lin.weight = bnb.nn.Int8Params(w.to(torch.float16 if torch.device(device).type == "cuda" else dtype),
                                       requires_grad=False, has_fp16_weights=False)
        if bias is not None:  # before .to(): Int8Params quantizes there, and a meta bias cannot move
            lin.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return lin.to(device)
    if bias is not None:
        lin.bias = nn.Parameter(bias.to(dtype).to(device), requires_grad=False)
    return lin


@dataclass(eq=False)
class WeightFile:
    """A checkpoint feeding :func:`fill_from_safetensors`: its reader (one file or shards), the name
    errors give it (a file or a folder), and which of its keys may stay unused."""

    reader: SafetensorsFile | ShardedSafetensors
    name: str
    ignore: Callable[[str], bool] = field(default=lambda key: False)


# model key -> (checkpoint, key in it, optional (file shape -> model shape, fp32 tensor -> tensor))
Source = tuple[WeightFile, str, tuple[Callable, Callable] | None]


def _fmt_groups(what: str, groups: dict[str, list[str]]) -> list[str]:
    return [f"{where}: {what} ({len(keys)}): {_fmt_keys(keys)}" for where, keys in groups.items()]


def fill_from_safetensors(
    model: nn.Module,
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    source_key: Callable[[str, set[str]], str | None] | None = None,
    skip_prefixes: tuple[str, ...] = (),
    skip: Collection[str] = (),
    sources: Mapping[str, Source] | None = None,
    trainable: bool = False,
) -> None:
    """Fill every meta tensor of ``model`` from safetensors; strict on keys and shapes.

    Either ``path`` (one ``.safetensors`` file or a ``*.index.json`` of shards), whose keys are the
    model's (``source_key(model_key, file_keys)`` may redirect a model key to another file key, e.g.
    upcycling an expert from the base weights), or ``sources``: ``{model_key: (WeightFile, file_key,
    transform)}`` over several checkpoints (FoX's Qwen2 + SigLIP folders), where ``transform = (shape_fn,
    fn)`` maps a stored tensor (read in fp32) to the model's layout. Model keys under ``skip_prefixes``
    or in ``skip`` are filled elsewhere (the VAE, new or tied parameters).

    Floating tensors become ``dtype``; integer tensors keep the file's dtype. Tensors are read in file
    order with plain reads straight into their final storage (see :class:`SafetensorsFile`); with
    ``quantize`` the decoder's Linear weights (:func:`is_quantizable`) are read one at a time in
    ``dtype`` (on CPU with NF4: in row blocks, :func:`nf4_quantize_rows`) and replaced by bitsandbytes
    layers. Every file is closed on return.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: truncated/corrupt file, missing or unexpected keys, mis-shaped keys, or a
            model tensor left on the meta device; the message names the files (or folders) and keys.
        ValueError: unknown ``quantize``, or neither / both of ``path`` and ``sources``.
    """
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if (path is None) == (sources is None):
        raise ValueError("fill_from_safetensors: pass either path or sources")
    skip = set(skip)
    targets = {k: v for k, v in model.state_dict(keep_vars=True).items()
               if not k.startswith(skip_prefixes) and k not in skip}
    if path is not None:
        wf = WeightFile(open_weights(path), str(path))
        file_keys = set(wf.reader.keys())
        sources = {}
        for k in targets:
            s = k if k in file_keys else (source_key(k, file_keys) if source_key else None)
            if s is not None:
                sources[k] = (wf, s, None)
    files = list({id(src[0]): src[0] for src in sources.values()}.values())
    if path is not None and not files:
        files = [wf]
    try:
        _fill(model, targets, sources, files, dtype=dtype, device=device, quantize=quantize, trainable=trainable)
    finally:
        for f in files:
            f.reader.close()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.is_meta and not n.startswith(skip_prefixes) and n not in skip]
    if left:
        raise CheckpointError(f"{', '.join(f.name for f in files)}: model tensors not filled from the file "
                              f"(would stay uninitialised): {_fmt_keys(left)}")


def _fill(model: nn.Module, targets: dict[str, torch.Tensor], sources: Mapping[str, Source], files: list[WeightFile],
          *, dtype: torch.dtype, device, quantize: str | None, trainable: bool) -> None:
    missing: dict[str, list[str]] = {}
    used: dict[int, set[str]] = {id(f): set() for f in files}
    stored = {id(f): set(f.reader.keys()) for f in files}
    for k in targets:
        src = sources.get(k)
        if src is None:
            missing.setdefault(files[0].name if len(files) == 1 else "(no source)", []).append(k)
        elif src[1] not in stored[id(src[0])]:
            missing.setdefault(src[0].name, []).append(src[1])
        else:
            used[id(src[0])].add(src[1])
    unexpected: dict[str, list[str]] = {}
    for f in files:
        for k in f.reader.keys():
            if k not in used[id(f)] and not f.ignore(k):
                unexpected.setdefault(str(f.reader.file_of(k)), []).append(k)
    if missing or unexpected:
        raise CheckpointError("checkpoint does not match the model built from its config: " + "; ".join(
            _fmt_groups("missing keys", missing) + _fmt_groups("unexpected keys", unexpected)))
    bad: dict[str, list[str]] = {}
    for k, t in targets.items():
        f, fk, tr = sources[k]
        shape = tuple(f.reader.shape(fk))
        if (tuple(tr[0](shape)) if tr else shape) != tuple(t.shape):
            at = "" if fk == k else f" at {k}"
            bad.setdefault(str(f.reader.file_of(fk)), []).append(f"{fk} {list(shape)} (model expects {list(t.shape)}{at})")
    if bad:
        n = sum(len(v) for v in bad.values())
        raise CheckpointError("; ".join(f"{where}: mis-shaped keys (does the config contradict the weights?): "
                                        + "; ".join(items[:8]) for where, items in bad.items())
                              + (f" ... ({n} in all)" if n > 8 else ""))

    def read(k: str, dev) -> torch.Tensor:
        f, fk, tr = sources[k]
        fdt = f.reader.dtype(fk)
        if tr is None:
            return f.reader.read(fk, dtype if fdt.is_floating_point else fdt, dev)
        t = tr[1](f.reader.read(fk, torch.float32 if fdt.is_floating_point else fdt))  # transforms run in fp32
        return t.to(dtype if t.is_floating_point() else t.dtype).to(dev)

    order = {id(f): i for i, f in enumerate(files)}

    def position(k: str):
        f, fk, _ = sources[k]
        return order[id(f)], f.reader.offset(fk)

    quantized = {k.rsplit(".", 1)[0] for k in targets if quantize and is_quantizable(k)}
    # one job per plain tensor and one per quantized module, in file order (sequential reads)
    jobs = [(position(k), k, False) for k in targets if k.rsplit(".", 1)[0] not in quantized]
    jobs += [(position(m + ".weight"), m, True) for m in quantized]
    jobs.sort()
    on_cpu = torch.device(device).type == "cpu"
    for _, k, quant in jobs:
        if not quant:
            _set_tensor(model, k, read(k, device), requires_grad=trainable)
            continue
        f, wkey, tr = sources[k + ".weight"]
        shape = tuple(f.reader.shape(wkey))
        if quantize == "nf4" and on_cpu and tr is None:  # row blocks: never the whole weight in `dtype`
            w = f.reader.iter_rows(wkey, nf4_rows_per_block(shape, dtype.itemsize), dtype)
        else:  # CUDA: read to the device, bitsandbytes quantizes there; int8: bnb's own path
            w = read(k + ".weight", device if quantize == "nf4" else "cpu")
            shape = tuple(w.shape)
        b = read(k + ".bias", "cpu") if (k + ".bias") in targets else None
        parent_name, _, attr = k.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, _quantized_linear(w, b, quantize, dtype, device, shape))
        del w, b


def upcycle_source_key(model_key: str, file_keys: set[str]) -> str | None:
    """A new expert's weight (``*_moe_sem*``) starts from the base (understanding) expert's."""
    if "_moe_sem" in model_key:
        k = model_key.replace("_moe_sem", "")
        return k if k in file_keys else None
    return None


def infer_bagel_config(folder: Path, llm: LLMConfig, vit: ViTConfig, ema: Path) -> dict:
    """Read the BAGEL-level constants upstream passes in code from the checkpoint's tensor shapes."""
    f = open_weights(ema)
    keys = set(f.keys())
    out = {}
    for key, field_ in (("latent_pos_embed.pos_embed", "max_latent_size"), ("vit_pos_embed.pos_embed", "vit_max_num_patch_per_side")):
        if key not in keys:
            raise CheckpointError(f"{ema}: missing key {key}")
        rows = f.shape(key)[0]
        side = math.isqrt(rows)
        if side * side != rows:
            raise CheckpointError(f"{ema}: {key} has {rows} rows, not a square grid")
        out[field_] = side
    if any("_moe_sem" in k for k in keys):  # a checkpoint saved with three experts
        out.update(experts=("", "_moe_sem", "_moe_gen"), routing=(0, 1, 2))
    if "vae2llm.weight" in keys:
        pdim = f.shape("vae2llm.weight")[1]
        out["latent_channels"] = pdim // 4  # 2x2 latent patches
    return out


def load_tokenizer(folder: str | Path):
    """The Qwen2 tokenizer files of the release folder (vocab.json + merges.txt [+ tokenizer.json])."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "vocab.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json", "special_tokens_map.json"):
        f = folder / name
        if f.is_file():  # transformers' own errors do not say which file is broken
            try:
                json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{f}: not valid JSON ({e}); the tokenizer cannot be loaded") from e
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from e


def special_token_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for field_, tok in (("bos_id", "<|im_start|>"), ("eos_id", "<|im_end|>"),
                        ("start_of_image", "<|vision_start|>"), ("end_of_image", "<|vision_end|>")):
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {tok} token")
        ids[field_] = int(i)
    return ids


def load_bagel(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    quantize: str | None = None,
    device: str | torch.device = "cpu",
    load_vae: bool = True,
    three_experts: bool = False,
    timestep_shift: float = 1.0,
    vae_dtype: torch.dtype | None = None,
) -> BagelModel:
    """Load a BAGEL release folder (llm_config.json, vit_config.json, ema.safetensors — or shards with
    model.safetensors.index.json, as a sharded merge writes — ae.safetensors, tokenizer files; optional
    ae_config.json for non-FLUX autoencoders).

    ``quantize="nf4"`` / ``"int8"`` turns the decoder's Linear layers of every expert into bitsandbytes
    4-/8-bit layers; embeddings, norms, lm_head, ViT, VAE and connectors stay in ``dtype``.
    ``three_experts=True`` splits the understanding expert into linguistic + semantic (``_moe_sem``
    starts as a copy of the understanding weights). Raises FileNotFoundError / CheckpointError naming
    the file and keys on any mismatch.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: BAGEL folder not found. {WEIGHTS_HINT}")
    needed = list(RELEASE_FILES) + (["ae.safetensors"] if load_vae else [])
    absent = [n for n in needed if not (folder / n).is_file()
              and not (n == "ema.safetensors" and (folder / INDEX_FILE).is_file())]
    if absent:
        raise FileNotFoundError(f"{folder}: missing {', '.join(absent)} (a BAGEL release folder holds "
                                f"{', '.join(needed)} and the tokenizer files). {WEIGHTS_HINT}")
    cfg = bagel_release_config(folder)
    cfg.timestep_shift = timestep_shift
    ema = release_weights(folder)
    if three_experts and len(cfg.experts) == 2:
        cfg = BagelConfig.three_experts(cfg)
    with torch.device("meta"):
        model = BagelModel(cfg)
    fill_from_safetensors(model, ema, dtype=dtype, device=device, quantize=quantize,
                          source_key=upcycle_source_key if three_experts else None)
    if load_vae:
        from ftkit.models.vae import AEConfig, load_ae

        ae_cfg = AEConfig.from_json(folder / "ae_config.json") if (folder / "ae_config.json").is_file() else AEConfig.flux()
        model.vae = load_ae(folder / "ae.safetensors", ae_cfg, dtype=vae_dtype or dtype, device=device)
        model.vae.requires_grad_(False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded BAGEL from %s (%s, quantize=%s, experts=%s)", folder, dtype, quantize, cfg.experts)
    return model
