"""Integer-only value noise, vectorised over windows and octaves.

Why integers: the generated base terrain is hashed into every edited chunk record
(``base_fingerprint``), so it must be bit-identical on every platform, compiler and numpy
version for the life of a world. Float noise is not (FMA contraction, SIMD paths, libm). Every
step here is wrapping ``uint64`` hashing, ``int32``/``int64`` fixed-point products that provably
fit, or shifts and masks by powers of two, all of which are exactly specified.

Pipeline for one field (height or moisture) made of octaves ``o = 0..n-1`` with lattice cell
``2**k_o`` tiles (``k_o = scale_log2 - o``):

1. lattice value ``v(o, i, j) = mix((i * P1) ^ (j * P2 + salt_o)) >> (48 + o)`` (``mix`` is
   splitmix64's finaliser, all wrapping ``uint64``; ``salt_o`` derives from seed, field and
   octave): a value in ``[0, 2**(16 - o))``, so octave amplitudes halve without a multiply;
2. fractions ``t = (x mod 2**k) << (15 - k)`` eased by integer smoothstep
   ``s = t*t*(3*2**15 - 2*t) >> 30`` (15-bit fixed point);
3. interpolation along x, then along y: ``a + (((b - a) * s) >> 15)`` in ``int32``
   (``|b - a| < 2**16`` and ``s < 2**15``, so the product fits; ``>>`` is an arithmetic shift,
   i.e. floor division, on every platform numpy supports);
4. sum of the octaves, then normalise to 0..1023 with a fixed-point reciprocal:
   ``(sum * (2**30 // total)) >> 20`` where ``total`` is the sum of the octaves' value ranges
   (a multiply, not an integer division, which is ~10x slower in numpy).

All octaves of both fields are stacked on one axis so a chunk costs a few dozen numpy calls.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]

MASK64: Final = (1 << 64) - 1
FRAC_BITS: Final = 15
ONE: Final = 1 << FRAC_BITS
VALUE_BITS: Final = 16
#: Output range of a normalised field: 0..2**LEVEL_BITS - 1.
LEVEL_BITS: Final = 10
RECIP_BITS: Final = 20

_C1: Final = np.uint64(0xBF58476D1CE4E5B9)
_C2: Final = np.uint64(0x94D049BB133111EB)
_P1: Final = np.uint64(0x9E3779B97F4A7C15)
_P2: Final = np.uint64(0xC2B2AE3D27D4EB4F)
_S30: Final = np.uint64(30)
_S27: Final = np.uint64(27)
_S31: Final = np.uint64(31)

# Field ids mixed into the salts so height, moisture and the default placements are independent.
FIELD_HEIGHT: Final = 1
FIELD_MOISTURE: Final = 2
FIELD_FEATURES: Final = 3
FIELD_NPCS: Final = 4


def splitmix64(x: int) -> int:
    """Scalar splitmix64 in Python ints (masked), for deriving salts."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def salt(seed: int, field: int, octave: int = 0) -> int:
    """A 64-bit salt for one (seed, field, octave); ``seed`` is taken modulo 2**64."""
    return splitmix64((seed & MASK64) ^ splitmix64((field << 16) | octave))


def mix64(z: U64) -> U64:
    """splitmix64's finaliser on a uint64 array (wrapping multiply; arrays never warn).

    Never call this on numpy scalars: scalar uint64 overflow warns, and tests turn warnings into
    errors.
    """
    z = z ^ (z >> _S30)
    z = z * _C1
    z = z ^ (z >> _S27)
    z = z * _C2
    return z ^ (z >> _S31)


def as_u64(a: I64) -> U64:
    """Two's-complement reinterpretation, so negative coordinates hash as distinct values."""
    return np.ascontiguousarray(a, dtype=np.int64).view(np.uint64)


def hash2(xs: I64, ys: I64, salt_: U64 | int) -> U64:
    """``mix((x * P1) ^ (y * P2 + salt))``, broadcasting ``xs`` against ``ys``.

    The multiplies spread each coordinate over all 64 bits before they meet; ``mix`` is a
    bijection with full avalanche, so nearby lattice points get unrelated values.
    """
    s = np.asarray(salt_, dtype=np.uint64)
    return mix64((as_u64(xs) * _P1) ^ (as_u64(ys) * _P2 + s))


def smoothstep(t: I64) -> I32:
    """Integer smoothstep on 15-bit fractions: 3t^2 - 2t^3 in fixed point (t^2 * 2^17 < 2^47)."""
    s = (t * t * (3 * ONE - 2 * t)) >> (2 * FRAC_BITS)
    return s.astype(np.int32)


# A gather is cheaper than the six ufunc calls of the formula on these small arrays.
_SMOOTH: Final[I32] = smoothstep(np.arange(ONE, dtype=np.int64))
_SMOOTH.flags.writeable = False


_POOL = threading.local()
#: Scratch above this many int32 elements is not pooled: a one-off huge window must not pin
#: its memory in every thread that ever ran one. A batch of 8 chunks needs 8 * O * 4096.
_POOL_MAX: Final = 1 << 19


def _scratch(n: int, o: int, h: int, w: int) -> tuple[I32, I32]:
    """Two uninitialised int32 arrays of shape (n, o, h, w), reused across calls in this thread.

    Pooled per (o, h, w) with room for the largest ``n`` seen, so a final partial batch reuses
    the full batch's buffers (a prefix of a C-contiguous array is contiguous).
    """
    if n * o * h * w > _POOL_MAX:
        return np.empty((n, o, h, w), dtype=np.int32), np.empty((n, o, h, w), dtype=np.int32)
    bufs: dict[tuple[int, int, int], tuple[I32, I32]] | None = getattr(_POOL, "bufs", None)
    if bufs is None:
        bufs = _POOL.bufs = {}
    pair = bufs.get((o, h, w))
    if pair is None or pair[0].shape[0] < n:
        if pair is None and len(bufs) >= 4:
            bufs.clear()
        shape = (n, o, h, w)
        pair = bufs[(o, h, w)] = (np.empty(shape, dtype=np.int32), np.empty(shape, dtype=np.int32))
    return pair[0][:n], pair[1][:n]


@dataclass(frozen=True, slots=True)
class OctaveStack:
    """Octaves of several fields stacked on one axis. Built once per generator.

    The per-octave constants are stored pre-shaped (O, 1) so the hot path broadcasts them
    without reshaping: on these small arrays numpy call overhead, not arithmetic, is the cost.
    """

    #: log2 cell size per octave, shape (O, 1).
    ks: I64
    #: ``2**k - 1`` per octave, shape (O, 1).
    masks: I64
    #: ``15 - k`` per octave, shape (O, 1): fraction to 15-bit fixed point.
    frac_shifts: I64
    #: Lattice salt per octave, shape (O, 1, 1).
    salts: U64
    #: Right shift turning a hash into the octave's value, shape (O, 1, 1): 48 + amplitude index.
    vshift: U64
    #: Octave count of each field, in stacking order.
    counts: tuple[int, ...]
    #: Fixed-point reciprocal per field: ``level = (sum * recip) >> RECIP_BITS``.
    recips: tuple[int, ...]
    #: Smallest k: sets how many lattice points a window needs.
    kmin: int

    @classmethod
    def build(cls, seed: int, fields: list[tuple[int, int, int]]) -> OctaveStack:
        """``fields``: ``(field_id, scale_log2, octaves)`` each."""
        ks: list[int] = []
        salts: list[int] = []
        shifts: list[int] = []
        counts: list[int] = []
        recips: list[int] = []
        for field, scale_log2, octaves in fields:
            if not 1 <= octaves <= scale_log2 + 1 or scale_log2 > FRAC_BITS:
                raise ValueError(f"bad octave spec for field {field}: {scale_log2=} {octaves=}")
            for o in range(octaves):
                ks.append(scale_log2 - o)
                salts.append(salt(seed, field, o))
                shifts.append(64 - VALUE_BITS + o)
            counts.append(octaves)
            total = sum(1 << (VALUE_BITS - o) for o in range(octaves))
            # floor, so sum < total gives a level < 2**LEVEL_BITS; sum * recip < 2**30 fits int32.
            recips.append((1 << (RECIP_BITS + LEVEL_BITS)) // total)
        k = np.array(ks, dtype=np.int64)[:, None]
        return cls(
            ks=k,
            masks=(1 << k) - 1,
            frac_shifts=FRAC_BITS - k,
            salts=np.array(salts, dtype=np.uint64)[:, None, None],
            vshift=np.array(shifts, dtype=np.uint64)[:, None, None],
            counts=tuple(counts),
            recips=tuple(recips),
            kmin=min(ks),
        )


def fields(
    stack: OctaveStack,
    x0: I64,
    y0: I64,
    w: int,
    h: int,
    trace: dict[str, npt.NDArray[np.generic]] | None = None,
) -> list[I32]:
    """Normalised fields (levels 0..1023) over ``N`` windows of ``h`` x ``w`` tiles.

    ``x0``/``y0`` (shape (N,)) are the windows' top-left world tiles; any alignment works, and a
    tile's value depends only on its world coordinates, so windows tile seamlessly. Returns one
    ``int32`` array of shape (N, h, w) per field, indexed ``[n, y, x]``. ``trace``, when given,
    receives every intermediate array (tests use it to prove nothing is a float).
    """
    n = x0.shape[0]
    o = stack.ks.shape[0]

    def axis(origin: I64, length: int) -> tuple[I64, I32, I64, int]:
        coords = (origin[:, None] + np.arange(length, dtype=np.int64))[:, None, :]  # (N, 1, L)
        # Arithmetic shift / mask by a power of two: floor division and modulo, negatives too.
        base = origin[:, None, None] >> stack.ks  # (N, O, 1)
        idx = (coords >> stack.ks) - base  # (N, O, L)
        t = (coords & stack.masks) << stack.frac_shifts
        # Enough lattice points for the worst alignment at the finest octave, plus the right
        # neighbour; coarser octaves are padded to the same count so they stack.
        lattice = ((length - 1) >> stack.kmin) + 3
        return idx, _SMOOTH[t], base, lattice

    if w == h:
        # One pass for both axes: these small arrays cost call overhead, not arithmetic.
        idx, weight, base, lx = axis(np.concatenate([x0, y0]), w)
        xi, yi, sx, sy, bx, by = idx[:n], idx[n:], weight[:n], weight[n:], base[:n], base[n:]
        ly = lx
    else:
        xi, sx, bx, lx = axis(x0, w)
        yi, sy, by, ly = axis(y0, h)

    ixs = bx + np.arange(lx, dtype=np.int64)  # (N, O, Lx)
    iys = by + np.arange(ly, dtype=np.int64)  # (N, O, Ly)
    z = hash2(ixs[:, :, None, :], iys[:, :, :, None], stack.salts)  # (N, O, Ly, Lx)
    values = (z >> stack.vshift).astype(np.int32)

    # Interpolate along x on the small lattice rows: gather from the flattened lattice.
    cols = (np.arange(n * o * ly, dtype=np.intp) * lx).reshape(n, o, ly, 1) + xi[:, :, None, :]
    flat = values.reshape(-1)
    left = np.take(flat, cols)  # (N, O, Ly, w)
    xinterp = np.take(flat, cols + 1)
    xinterp -= left
    xinterp *= sx[:, :, None, :]
    xinterp >>= FRAC_BITS
    xinterp += left

    # Interpolate along y on the full window: whole-row gathers are contiguous copies. The two
    # full-size temporaries come from a per-thread pool: fresh ones of this size are mmapped
    # and page-faulted on every call, which costs more than the arithmetic.
    ridx = (np.arange(n * o, dtype=np.intp) * ly).reshape(n, o, 1) + yi
    xrows = xinterp.reshape(n * o * ly, w)
    top, octaves = _scratch(n, o, h, w)
    # mode="clip" only to skip numpy's buffering of ``out``: indices are in range by construction.
    np.take(xrows, ridx, axis=0, out=top, mode="clip")
    np.take(xrows, ridx + 1, axis=0, out=octaves, mode="clip")
    octaves -= top
    octaves *= sy[:, :, :, None]
    octaves >>= FRAC_BITS
    octaves += top

    out: list[I32] = []
    start = 0
    for count, recip in zip(stack.counts, stack.recips, strict=True):
        level = np.add.reduce(octaves[:, start : start + count], axis=1, dtype=np.int32)
        start += count
        if trace is not None:
            trace[f"field{len(out)}_sum"] = level.copy()
        level *= recip
        level >>= RECIP_BITS
        out.append(level)

    if trace is not None:
        trace.update(
            x_index=xi,
            y_index=yi,
            x_weight=sx,
            y_weight=sy,
            lattice_hash=z,
            lattice_values=values,
            x_interp=xinterp,
            octaves=octaves.copy(),
        )
        for i, level in enumerate(out):
            trace[f"field{i}"] = level.copy()  # the caller reuses the array in place
    return out
