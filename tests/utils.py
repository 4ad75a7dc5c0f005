"""Numerical helpers shared by the tests."""
import torch

# ||out - ref|| / ||ref|| bounds by compute dtype, against a float64 reference.
REL_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of ``out`` against ``ref`` (computed in float64); NaN never passes."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


def assert_close_rel(out, ref, dtype, what="output", tol=None):
    tol = REL_TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype})"
