"""Surgery: the modules that hold insertion points rewritten so each gets its block
(:mod:`.inject`, :mod:`.rewrite`), and the record a patched model carries (:mod:`.record`)."""
