"""Keys: files and their crash-safe writes, the immutable key set, the live store, and /rec itself."""
