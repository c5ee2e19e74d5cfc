"""Image tokenizers: the VQGAN whose codebook ids MAGE generates (paper section 3.3).

- rcg.tokenizers.vqgan: the network (MaskGIT's VQGAN and smaller sizes), save / `load_tokenizer`;
- rcg.tokenizers.official: strict, weights-only loading of the official MaskGIT checkpoint;
- rcg.tokenizers.train: training one on the train shards, for a domain the official one does not fit;
- rcg.tokenizers.quality: reconstruction error, codebook usage and the Frechet distance of
  reconstructions (metrics/tokenizer.json).
"""

from rcg.tokenizers.vqgan import VQ_ARCHS, VQGAN, build_vqgan, load_tokenizer, save_tokenizer

__all__ = ["VQ_ARCHS", "VQGAN", "build_vqgan", "load_tokenizer", "save_tokenizer"]
