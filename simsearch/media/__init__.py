"""Images from disk: finding them, decoding them within bounds, preprocessing.

- `formats`: the formats and file suffixes indexed (what the installed Pillow opens);
- `discover`: finding image files in folders, and folders that hold none;
- `decode`: reading a file within bounds, decoding it safely to upright RGB;
- `header`: a file's true pixel size and format, from its header alone;
- `preprocess`: model input, as transformers' image processors make it;
- `prefetch`: reading and decoding ahead in threads while the model runs;
- `thumbnail`: the reports' thumbnails, as JPEG data: URIs.
"""
