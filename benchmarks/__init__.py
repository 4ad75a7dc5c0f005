"""Benchmarks of pyowt's ops and strategies, and what they share."""


def rel_l2(out, ref) -> float:
    """||out - ref|| / ||ref|| computed in float32 on the tensors' device (the benchmarks'
    correctness gate before timing; the tests' float64 rel_err would copy to the CPU)."""
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
