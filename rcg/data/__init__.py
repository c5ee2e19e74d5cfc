"""Image data: sources (Fashion-MNIST, folders), shard writing, and the shared shard reader."""
