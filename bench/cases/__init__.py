"""Benchmark cases. Each module defines:

* ``BASELINE``: the variant every ratio is taken against (the dense reference);
* ``variants(device)``: the variants to run (backends, then public alternatives);
* ``size(device, quick)``: the problem size as a dict (the issues' target sizes by default);
* ``build(variant, size, device)``: make the inputs and return a no-argument step
  (forward + backward unless the variant says otherwise).
"""

from cases import linear_cross_entropy, training_step, tree_attention

CASES = {
    "tree_attention": tree_attention,
    "linear_cross_entropy": linear_cross_entropy,
    "training_step": training_step,
}
