"""``dino infer`` (the command; the job itself is ``serving.infer``)."""
