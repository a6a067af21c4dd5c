"""The zoo: planning (and identity-checking) every recipe on every timm and torchvision model
(:mod:`.sweep`), written as a Markdown and CSV report (:mod:`.report`)."""
