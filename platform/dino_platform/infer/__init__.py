"""Offline batch inference over a bucket of images or shards on Ray Data (``dino infer``)."""
