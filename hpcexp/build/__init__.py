"""Recipe -> SIF: image identity, the rootless builder, the image store and base images."""
