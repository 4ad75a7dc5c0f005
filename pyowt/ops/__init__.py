"""pyowt's operators: registered with torch.library, differentiable, backend-selectable.

See :mod:`pyowt.ops.backend` for how a backend is chosen.
"""
from .backend import BACKENDS, registered_ops, resolve_backend
from .bias_relu import bias_relu, bias_relu_reference

__all__ = ["BACKENDS", "bias_relu", "bias_relu_reference", "registered_ops", "resolve_backend"]
from .conv2d import conv2d_bias_act; __all__ += ["conv2d_bias_act"]  # noqa: E402,E702
from .linear import linear_bias_act, linear_bias_act_reference; __all__ += ["linear_bias_act", "linear_bias_act_reference"]  # noqa: E402,E702
