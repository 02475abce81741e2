"""GPU check of the circatt CUDA kernels (ops/csrc/cuda): build, correctness, timings.

Builds the extension for the present GPU (timed), checks every function against float64
references written here with torch.roll (fresh random inputs, H != W, windows 1..35, heads 1
and 4, channel counts that are not multiples of the kernels' channel groups, outputs poisoned
with NaN), checks the fused attention backward against autograd through the composed reference,
then times the GroupCDL training step (B=12, C=64, 64x64, window 35) against a plain-PyTorch
roll reference, plus the fused attention. Prints a short table last.

Run from the repository root on a CUDA machine:  scripts/gpu_check.sh [--no-timing] [--quick]
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import statistics
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.abspath(os.environ.get("CIRCATT_CHECK_SRC") or os.path.join(ROOT, "ops", "csrc", "cuda"))
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def build():
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    sources = sorted(glob.glob(os.path.join(SRC, "*.cu")) + glob.glob(os.path.join(SRC, "*.cpp")))
    bdir = os.environ.get("CIRCATT_CHECK_BUILD", "/tmp/circatt_check_build")
    os.makedirs(bdir, exist_ok=True)
    t0 = time.time()
    ext = load(
        name="circatt_cuda_check",
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        extra_include_paths=[SRC],
        build_directory=bdir,
        verbose=False,
    )
    return ext, time.time() - t0


# ---------------------------------------------------------------- references (plain PyTorch)


def ref_similarity(q, k, ws, dist):
    """S[..., a*ws+c] = q . k shifted by (a-r, c-r) (wrapped); distance: -|q-k|^2/2."""
    r = ws // 2
    cols = []
    for a in range(ws):
        for c in range(ws):
            kr = torch.roll(k, (r - a, r - c), (-2, -1))
            cols.append(-0.5 * (q - kr).pow(2).sum(2) if dist else (q * kr).sum(2))
    return torch.stack(cols, -1)


def ref_apply(A, x, ws, transposed):
    """y = A x (gather over the window) or A^T x (each row's weights pushed back to its keys)."""
    r = ws // 2
    y = torch.zeros_like(x)
    for a in range(ws):
        for c in range(ws):
            w = A[..., a * ws + c].unsqueeze(2)
            if transposed:
                y = y + torch.roll(w * x, (a - r, c - r), (-2, -1))
            else:
                y = y + w * torch.roll(x, (r - a, r - c), (-2, -1))
    return y


def ref_attention(q, k, v, ws, dist, scale):
    logits = ref_similarity(q, k, ws, dist) * scale
    lse = torch.logsumexp(logits, -1)
    p = torch.exp(logits - lse.unsqueeze(-1))
    return ref_apply(p, v, ws, False), lse


def roll_similarity_fast(q, k, ws, dist, out=None):
    """The roll reference used for timing (no autograd, float32, writes into a K-last tensor)."""
    r = ws // 2
    B, G, C, H, W = q.shape
    out = torch.empty(B, G, H, W, ws * ws, device=q.device, dtype=q.dtype) if out is None else out
    for a in range(ws):
        for c in range(ws):
            kr = torch.roll(k, (r - a, r - c), (-2, -1))
            if dist:
                out[..., a * ws + c].copy_((q - kr).square_().sum(2).mul_(-0.5))
            else:
                out[..., a * ws + c].copy_((q * kr).sum(2))
    return out


def roll_apply_fast(A, x, ws, transposed):
    r = ws // 2
    y = torch.zeros_like(x)
    for a in range(ws):
        for c in range(ws):
            w = A[..., a * ws + c].unsqueeze(2)
            if transposed:
                y.add_(torch.roll(w * x, (a - r, c - r), (-2, -1)))
            else:
                y.add_(w * torch.roll(x, (r - a, r - c), (-2, -1)))
    return y


# ---------------------------------------------------------------- correctness


def rel(out, ref, floor=0.0):
    """||out - ref|| / max(||ref||, floor); NaN when out has a non-finite entry (e.g. unwritten)."""
    if out.shape != ref.shape:
        return float("inf")
    out = out.double()
    ref = ref.double()
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out - ref).norm() / max(ref.norm().item(), floor, 1e-300)).item()


class Results:
    def __init__(self):
        self.rows = []  # (name, dtype, worst error, tol, count, fails)
        self.worst = {}
        self.failures = []

    def add(self, op, dtype, err, where):
        tol = TOL[dtype]
        key = (op, str(dtype).replace("torch.", ""))
        w, n, f = self.worst.get(key, (0.0, 0, 0))
        bad = not (err <= tol)
        if bad:
            self.failures.append(f"{op} {key[1]} {where}: rel err {err:.3g} > {tol:g}")
        w = err if (math.isnan(err) or err > w or math.isnan(w)) else w
        self.worst[key] = (w, n + 1, f + int(bad))


def check_all(ext, res: Results, quick: bool, dev="cuda", shapes=None, heads=None, dtypes=DTYPES):
    ext._set_poison_outputs(True)
    if shapes is None:
        shapes = [((2, 20, 28), [1, 3, 5, 15]), ((1, 64, 64), [1, 3, 5, 15, 35])]
        if quick:
            shapes = [((2, 20, 28), [3, 15]), ((1, 64, 64), [35])]
    heads = heads or [(1, 16, 16), (4, 6, 10)]
    gen = torch.Generator(device=dev).manual_seed(1234)
    for (B, H, W), windows in shapes:
        for G, C, Cv in heads:
            for ws in windows:
                K = ws * ws
                rnd = lambda *s: torch.randn(*s, device=dev, dtype=torch.float64, generator=gen)  # noqa: E731
                q0, k0, x0 = rnd(B, G, C, H, W), rnd(B, G, C, H, W), rnd(B, G, C, H, W)
                v0, dy0 = rnd(B, G, Cv, H, W), rnd(B, G, Cv, H, W)
                A0 = rnd(B, G, H, W, K)
                scale = 1.0 / math.sqrt(C)
                for dt in dtypes:
                    where = f"B{B} G{G} C{C} Cv{Cv} {H}x{W} ws{ws}"
                    q, k, x, v, dy, A = (t.to(dt) for t in (q0, k0, x0, v0, dy0, A0))
                    qd, kd, xd, vd, dyd, Ad = (t.double() for t in (q, k, x, v, dy, A))
                    try:
                        for dist in (False, True):
                            S = ext.similarity(q, k, ws, dist)
                            res.add("similarity " + ("distance" if dist else "dot"), dt,
                                    rel(S, ref_similarity(qd, kd, ws, dist)), where)
                        for tr in (False, True):
                            y = ext.apply(A, x, ws, tr)
                            res.add("apply" + (" transposed" if tr else ""), dt, rel(y, ref_apply(Ad, xd, ws, tr)), where)
                        for dist in (False, True):
                            kind = "distance" if dist else "dot"
                            y, lse = ext.attention_forward(q, k, v, ws, dist, scale)
                            qr, kr, vr = (t.clone().requires_grad_(True) for t in (qd, kd, vd))
                            yr, lr = ref_attention(qr, kr, vr, ws, dist, scale)
                            res.add(f"attention fwd {kind} y", dt, rel(y, yr.detach()), where)
                            res.add(f"attention fwd {kind} lse", dt, rel(lse, lr.detach()), where)
                            yr.backward(dyd)
                            dq, dk, dv = ext.attention_backward(q, k, v, y, lse, dy, ws, dist, scale)
                            # window 1: one slot per row, P = 1 and dq = dk = 0 exactly; measure
                            # against the scale of the other gradient instead
                            fl = vr.grad.norm().item()
                            res.add(f"attention bwd {kind} dq", dt, rel(dq, qr.grad, fl), where)
                            res.add(f"attention bwd {kind} dk", dt, rel(dk, kr.grad, fl), where)
                            res.add(f"attention bwd {kind} dv", dt, rel(dv, vr.grad), where)
                    except Exception:  # noqa: BLE001
                        res.failures.append(f"EXCEPTION {dt} {where}:\n{traceback.format_exc()}")
                if dev == "cuda":
                    torch.cuda.synchronize()
                print(f"  checked B{B} G{G} C{C} Cv{Cv} {H}x{W} ws{ws}: {len(res.failures)} failures so far", flush=True)
    ext._set_poison_outputs(False)



def error_cases(ext, dev="cuda"):
    qe = torch.randn(1, 1, 4, 8, 8, device=dev)
    cases = [
        (lambda: ext.similarity(qe, qe, 4, False), "even window"),
        (lambda: ext.similarity(qe, qe, 9, False), "window > image"),
        (lambda: ext.similarity(qe, qe.double(), 3, False), "dtype mismatch"),
        (lambda: ext.apply(torch.randn(1, 1, 8, 8, 8, device=dev), qe, 3, False), "bad A shape"),
        (lambda: ext.similarity(qe[0], qe[0], 3, False), "4-D input"),
        (lambda: ext.attention_forward(qe, qe, qe[:, :, :, :4], 3, False, 1.0), "v of another size"),
    ]
    if dev == "cuda":
        cases.append((lambda: ext.similarity(qe.cpu(), qe.cpu(), 3, False), "cpu tensor"))
    return cases


def run_error_paths(ext, dev="cuda"):
    """Each bad input must raise RuntimeError with a clear message. Printed one by one: on the
    H100 image a C++ exception leaving the extension once killed the process (segfault in the
    unwinder), so main() runs this in a child process, last."""
    ok = 0
    cases = error_cases(ext, dev)
    for fn, what in cases:
        print(f"  error path ({what}) ...", flush=True)
        try:
            fn()
            print(f"  error path NOT RAISED: {what}", flush=True)
        except RuntimeError as e:
            ok += 1
            print(f"  error path ok ({what}): {str(e).splitlines()[0][:110]}", flush=True)
    print(f"error paths raised: {ok}/{len(cases)}", flush=True)
    return ok == len(cases)


# ---------------------------------------------------------------- timing


def bench(fn, reps=20, warmup=3):
    """Median and range in ms of `reps` timed calls after `warmup` (CUDA events; host clock off-GPU)."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            s = torch.cuda.Event(enable_timing=True)
            e = torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), (min(times), max(times))


def ceilings():
    n = 1 << 28  # 1 GiB of float32
    a = torch.randn(n, device="cuda")
    b = torch.empty_like(a)
    t, _ = bench(lambda: b.copy_(a), reps=20, warmup=3)
    copy_gbs = 2 * a.numel() * 4 / (t * 1e-3) / 1e9
    del a, b
    m = 8192
    x = torch.randn(m, m, device="cuda")
    y = torch.randn(m, m, device="cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    t, _ = bench(lambda: x @ y, reps=10, warmup=2)
    fp32 = 2 * m**3 / (t * 1e-3) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = old
    xb, yb = x.bfloat16(), y.bfloat16()
    t, _ = bench(lambda: xb @ yb, reps=10, warmup=2)
    bf16 = 2 * m**3 / (t * 1e-3) / 1e12
    return copy_gbs, fp32, bf16


def training_step(sim, app, q, k, xs, dys, ones, ws):
    """GroupCDL per-step op sequence: one distance similarity + softmax + five applies, and the backward."""
    S = sim(q, k, ws, True)
    A = torch.softmax(S, -1)
    del S
    ys = [app(A, x, ws, False) for x in xs]
    dA = None
    for dy, x in zip(dys, xs):
        t = sim(dy, x, ws, False)
        dA = t if dA is None else dA.add_(t)
    dxs = [app(A, dy, ws, True) for dy in dys]
    dS = A * (dA - (dA * A).sum(-1, keepdim=True))
    dq = app(dS, k, ws, False) - dS.sum(-1).unsqueeze(2) * q
    dk = app(dS, q, ws, True) - app(dS, ones, ws, True) * k
    return ys, dxs, dq, dk


def timings(ext, table, dev="cuda", small=False):
    """Training-shape ops and step (ours vs roll reference) and the fused attention.
    small=True shrinks every shape (a smoke test of this code off-GPU)."""
    B, G, C, H, W, ws = (2, 1, 8, 12, 16, 5) if small else (12, 1, 64, 64, 64, 35)
    K = ws * ws
    N = B * G * H * W
    g = torch.Generator(device=dev).manual_seed(7)
    rnd = lambda *s: torch.randn(*s, device=dev, generator=g)  # noqa: E731
    q, k = rnd(B, G, C, H, W), rnd(B, G, C, H, W)
    xs = [rnd(B, G, C, H, W) for _ in range(5)]
    dys = [rnd(B, G, C, H, W) for _ in range(5)]
    ones = torch.ones(B, G, 1, H, W, device=dev)
    A = torch.softmax(rnd(B, G, H, W, K), -1)
    flop = 2.0 * N * K * C

    # per-op agreement with the float32 roll reference at the training shape
    S_ours = ext.similarity(q, k, ws, True)
    S_ref = roll_similarity_fast(q, k, ws, True)
    e_sim = rel(S_ours, S_ref)
    del S_ours, S_ref
    e_app = rel(ext.apply(A, xs[0], ws, False), roll_apply_fast(A, xs[0], ws, False))
    e_apt = rel(ext.apply(A, xs[0], ws, True), roll_apply_fast(A, xs[0], ws, True))
    print(f"  training shape agreement with the fp32 roll reference: sim {e_sim:.2e}, apply {e_app:.2e}, "
          f"apply^T {e_apt:.2e}")

    ops = {}
    ops["similarity distance"] = (lambda: ext.similarity(q, k, ws, True), lambda: roll_similarity_fast(q, k, ws, True))
    ops["similarity dot"] = (lambda: ext.similarity(q, k, ws, False), lambda: roll_similarity_fast(q, k, ws, False))
    ops["apply"] = (lambda: ext.apply(A, xs[0], ws, False), lambda: roll_apply_fast(A, xs[0], ws, False))
    ops["apply transposed"] = (lambda: ext.apply(A, xs[0], ws, True), lambda: roll_apply_fast(A, xs[0], ws, True))
    for name, (ours, ref) in ops.items():
        t_o, spread = bench(ours, reps=20, warmup=3)
        t_r, _ = bench(ref, reps=2, warmup=1)
        table.append((f"{name} (train shape)", t_o, t_r, flop / (t_o * 1e-3) / 1e12, spread))
    steps_flop = 18 * flop
    t_o, spread = bench(lambda: training_step(ext.similarity, ext.apply, q, k, xs, dys, ones, ws), reps=10, warmup=2)
    t_r, _ = bench(lambda: training_step(roll_similarity_fast, roll_apply_fast, q, k, xs, dys, ones, ws), reps=2,
                   warmup=1)
    table.append(("GroupCDL step fwd+bwd (18 ops)", t_o, t_r, steps_flop / (t_o * 1e-3) / 1e12, spread))
    del A

    # fused attention
    def attn_cases():
        yield "train shape dist fp32", (B, G, C, H, W, ws, True, torch.float32)
        if small:
            yield "small dot bf16", (1, 2, 8, 12, 16, 3, False, torch.bfloat16)
            return
        yield "S1 dot fp32", (2, 1, 64, 128, 96, 15, False, torch.float32)
        yield "S1 dot bf16", (2, 1, 64, 128, 96, 15, False, torch.bfloat16)
        yield "S1 4 heads dot fp32", (2, 4, 16, 128, 96, 15, False, torch.float32)

    for name, (b, gg, c, h, w, win, dist, dt) in attn_cases():
        qa, ka, va, dya = (torch.randn(b, gg, c, h, w, device=dev).to(dt) for _ in range(4))
        sc = 1.0 / math.sqrt(c)
        fl = 2.0 * b * gg * h * w * win * win * c
        y, lse = ext.attention_forward(qa, ka, va, win, dist, sc)

        def composed():
            Sx = ext.similarity(qa, ka, win, dist).float().mul_(sc)
            P = torch.softmax(Sx, -1).to(dt)
            return ext.apply(P, va, win, False)

        e = rel(y, composed())
        t_f, spread = bench(lambda: ext.attention_forward(qa, ka, va, win, dist, sc), reps=20, warmup=3)
        t_c, _ = bench(composed, reps=10, warmup=2)
        table.append((f"attn fwd {name}", t_f, t_c, 2 * fl / (t_f * 1e-3) / 1e12, spread))
        t_b, spread = bench(lambda: ext.attention_backward(qa, ka, va, y, lse, dya, win, dist, sc), reps=10, warmup=2)
        table.append((f"attn bwd {name}", t_b, float("nan"), 7 * fl / (t_b * 1e-3) / 1e12, spread))
        print(f"  fused vs composed ({name}): rel {e:.2e}")


def diag(ext):
    """One call of each entry point on tiny inputs, synchronising and printing around each."""
    q = torch.randn(1, 1, 4, 8, 8, device="cuda")
    A = torch.randn(1, 1, 8, 8, 9, device="cuda")
    steps = [
        ("poison on", lambda: ext._set_poison_outputs(True)),
        ("similarity dot", lambda: ext.similarity(q, q, 3, False)),
        ("similarity distance", lambda: ext.similarity(q, q, 3, True)),
        ("apply", lambda: ext.apply(A, q, 3, False)),
        ("apply transposed", lambda: ext.apply(A, q, 3, True)),
        ("attention_forward", lambda: ext.attention_forward(q, q, q, 3, False, 0.5)),
        ("attention_backward", lambda: ext.attention_backward(q, q, q, q, q[:, :, 0], q, 3, False, 0.5)),
    ]
    for name, fn in steps:
        print(f"diag -> {name}", flush=True)
        fn()
        torch.cuda.synchronize()
        print(f"diag ok {name}", flush=True)


def print_correctness(res):
    print("\n==== correctness (worst relative error over all shapes / windows / heads) ====")
    for (op, dt), (w, n, f) in sorted(res.worst.items()):
        print(f"{op:34s} {dt:9s} worst {w:9.2e}  tol {TOL[getattr(torch, dt)]:6.0e}  {n:3d} cases  "
              f"{'FAIL ' + str(f) if f else 'ok'}")
    for f in res.failures[:12]:
        print("FAILURE:", f)
    if len(res.failures) > 12:
        print(f"... {len(res.failures) - 12} more failures")
    sys.stdout.flush()


def print_timings(ceil, table):
    print(f"\nceilings: copy {ceil[0]:.0f} GB/s (read+write), fp32 matmul {ceil[1]:.1f} TFLOP/s, "
          f"bf16 matmul {ceil[2]:.0f} TFLOP/s")
    print("==== timings (median ms; ref = roll reference, or for attn fwd the composed sim+softmax+apply) ====")
    print(f"{'case':44s} {'ours ms':>9s} {'ref ms':>10s} {'speedup':>8s} {'TFLOP/s':>8s}  spread")
    for name, t_o, t_r, tf, spread in table:
        sp = t_r / t_o if t_r == t_r else float("nan")
        print(f"{name:44s} {t_o:9.3f} {t_r:10.2f} {sp:8.1f} {tf:8.2f}  {spread[0]:.3f}-{spread[1]:.3f}")
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--diag", action="store_true", help="only call each entry point once, printing around each")
    ap.add_argument("--error-paths", action="store_true", help="only the error-path checks (run as a child)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
    ext, t_build = build()
    print(f"build: {t_build:.1f} s", flush=True)
    if args.diag:
        diag(ext)
        return 0
    if args.error_paths:
        return 0 if run_error_paths(ext) else 1
    res = Results()
    t0 = time.time()
    check_all(ext, res, args.quick)
    print(f"correctness checks: {time.time() - t0:.1f} s")
    print_correctness(res)
    table = []
    ceil = None
    if not args.no_timing:
        ceil = ceilings()
        print(f"ceilings: {ceil}", flush=True)
        timings(ext, table)
    import subprocess

    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--error-paths"], capture_output=True, text=True)
    lines = [ln for ln in child.stdout.splitlines() if ln.startswith(("  error path", "error paths"))]
    print("\n".join(lines))
    errors_ok = child.returncode == 0
    if not errors_ok:
        print(f"ERROR PATHS FAILED: child exit code {child.returncode} (negative: killed by that signal)")
        print(child.stderr[-1500:])

    print_correctness(res)
    if ceil:
        print_timings(ceil, table)
    ok = not res.failures and errors_ok
    print(f"\nbuild {t_build:.0f} s; RESULT: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
