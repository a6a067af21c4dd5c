"""Planning: a recipe's rules matched against a traced model's candidate positions
(:mod:`.match`), giving a :class:`~.points.Plan` of insertion points; the model is not changed."""
