"""Loading: model sources (hub ids, paths, URLs, the authors' releases), both checkpoint layouts with strict
key checks, precision, and assembling a ready model."""
