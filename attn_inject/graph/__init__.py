"""Graph analysis: tracing, tensor shapes and layouts, residual additions and stages, annotated
on the traced graph for planning to read."""
