"""The probe: a ``train_step`` that records the enabled instruments in-graph, and the host side that drains them.

* :mod:`ablations.probe.spec`: the model's tensors and blocks (:class:`~ablations.instruments.base.ProbeSpec`);
* :mod:`ablations.probe.model`: :class:`ProbedModel`, the generic loop over instruments inside the step;
* :mod:`ablations.probe.ring`: the device ring buffer, one slot per table;
* :mod:`ablations.probe.recorder`: :class:`DrainCallback`, ring -> long DataFrames;
* :mod:`ablations.probe.measure`: :func:`measure`, the same instruments for one batch, eagerly.
"""

from ablations.probe.measure import measure, measure_tables
from ablations.probe.model import ProbedModel
from ablations.probe.recorder import DrainCallback, ring_capacity, summarize
from ablations.probe.spec import make_spec

__all__ = ["DrainCallback", "ProbedModel", "make_spec", "measure", "measure_tables", "ring_capacity", "summarize"]
