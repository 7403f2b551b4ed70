"""Model building blocks: backbones and their sources, PEFT modules, heads, the mean teacher, CoSO's subspace optimiser, fused ops.

They may use the engine; they import no scenario, strategy or application module."""
