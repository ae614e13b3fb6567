"""The errors meshjax raises. Each names what the user wrote: the dim, the mesh axis, the tensor."""


class MeshjaxError(ValueError):
    """Base class of every error meshjax raises on bad input."""


class ShapeError(MeshjaxError):
    """Dims that do not fit: an unknown or repeated dim name, sizes that disagree."""


class EinsumError(MeshjaxError):
    """A malformed einsum spec, or operands that do not match it."""


class LayoutError(MeshjaxError):
    """A layout that cannot be placed on the mesh: unknown axis, axis used twice, indivisible dim."""


class TraceError(MeshjaxError):
    """A function that cannot be traced into a graph."""


class InfeasibleError(MeshjaxError):
    """No layout meets the constraints (memory budget, pins)."""
