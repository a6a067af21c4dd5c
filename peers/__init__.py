"""Peers' own test suites (timm, torchvision) run on patched models: a pytest plugin and its runner."""
