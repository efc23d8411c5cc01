"""Benchmark cases. Each module defines:

* ``baseline(device)``: the variant every ratio is taken against (the dense reference where it
  can run);
* ``variants(device)``: the variants to run (backends, then public alternatives);
* ``sizes(device, scale)``: the problem sizes, each a dict; ``scale`` is ``"quick"`` (a smoke
  run), ``"default"`` (the issues' target sizes, or a cut-down version of them where they
  take long) or ``"full"`` (the target sizes in full);
* ``label(size)``: a short name of one size for the table;
* ``build(variant, size, device)``: make the inputs and return a no-argument step (forward +
  backward unless the variant says otherwise) and a dict of notes;
* ``useful_flops(size, variant, device)``: the floating-point operations one step must do
  (the algorithm's, not an implementation's), for TFLOP/s;
* ``matmul_shapes(size, device)``: ``(dtype, [(batch, m, k, n[, count]), ...])``, the case's
  own matrix products (``count``: how often a step runs one), whose measured rate is the floor
  its TFLOP/s are held against;

and optionally ``floor(device)``: a variant whose time is a lower bound for the others (the
table shows each variant's time over it), ``skip(variant, size, device)``: why a variant
does not run at a size (None when it does), ``COLD_START = True``: a step is long enough
to be timed without a warm-up run, ``IN_DEFAULT_RUN = False``: only ``--case`` runs it, and
``VARIANT_MATMUL_DTYPE``: ``{variant: dtype}`` for variants that multiply in another dtype
than ``matmul_shapes`` says (a bfloat16 autocast variant), whose floor is then that dtype's rate.
"""

from cases import evaluation, generation, linear_cross_entropy, train, training_step, tree_attention

CASES = {
    "tree_attention": tree_attention,
    "linear_cross_entropy": linear_cross_entropy,
    "training_step": training_step,
    "train": train,
    "evaluation": evaluation,
    "generation": generation,
}
SCALES = ("quick", "default", "full")
