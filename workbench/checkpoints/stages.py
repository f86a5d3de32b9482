"""The stage labels a checkpoint can carry: steps of a run worth keeping whatever retention says.

A staged checkpoint is never pruned (``CheckpointManager``); the run layer and the panels list
the stages beside the step. These are the stages the workbench writes itself; a caller may label
a checkpoint with any other string.
"""

SVD = "svd"  # a compressed model factorised at full rank (``wb.compress``): the original's outputs, validated
SVD_INIT = "svd-init"  # step 0 of a run whose adapters start from the SVD of W (init="pissa"), validated
FINETUNED = "finetuned"  # the last checkpoint of a finished fit
RANK_REDUCED = "rank-reduced"  # adapters wb.reduce_checkpoint truncated, or a model wb.compress truncated

STAGES: tuple[str, ...] = (SVD, SVD_INIT, FINETUNED, RANK_REDUCED)
COMPRESSION_STAGES: tuple[str, ...] = (SVD, RANK_REDUCED, FINETUNED)  # wb.compress_task's stage runs, in order
