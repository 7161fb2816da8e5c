"""Shared test helpers: comparisons against float64 references."""

import torch


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """Assert ‖actual − expected‖ / ‖expected‖ <= rtol, computed in float64 (NaN fails)."""
    a = actual.detach().double().cpu().flatten()
    e = expected.detach().double().cpu().flatten()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = torch.linalg.vector_norm(a - e).item()
    ref = torch.linalg.vector_norm(e).item()
    rel = err / ref if ref > 0 else err
    assert rel <= rtol, f"relative error {rel:.3e} > {rtol:.1e}"
