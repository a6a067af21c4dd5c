"""Models as input: building one by name (:mod:`.build`), the sub-model a recipe targets
(:mod:`.targets`), and facts read off a built model (:mod:`.facts`)."""
