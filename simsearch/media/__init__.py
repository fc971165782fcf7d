"""Images from disk: finding them, decoding them within bounds, preprocessing."""
