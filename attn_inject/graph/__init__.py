"""Graph analysis: trace, shapes, layouts, residual additions, stages, insertion positions."""
