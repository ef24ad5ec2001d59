"""1-D signals at the edges of the program: line plots (uint8 images) and WAV files.

Signals are float arrays [N, L, C] in [-1, 1] (the samples of a `config.data.length` run).
Plots are drawn with PIL, WAVs written with the standard library's `wave` module.
"""

import os
import wave

import numpy as np
from PIL import Image, ImageDraw

SAMPLE_RATE = 8000  # Hz of the written WAV files
_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def plot_signals(
    signals: np.ndarray, num_cols: int | None = None, *, width: int = 256, height: int = 64
) -> np.ndarray:
    """One panel per signal (row-major, num_cols wide), channels in different colours, the
    range [-1, 1] spanning each panel's height.  signals: [N, L, C] -> uint8 [H, W, 3]."""
    if signals.ndim != 3:
        raise ValueError(f"signals must be [N, L, C], got shape {signals.shape}")
    n, length, channels = signals.shape
    num_cols = num_cols or int(np.ceil(np.sqrt(n)))
    num_rows = -(-n // num_cols)
    pad = 2
    canvas = Image.new(
        "RGB", (num_cols * (width + pad) + pad, num_rows * (height + pad) + pad), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    xs = np.linspace(0, width - 1, length)
    for i, signal in enumerate(np.clip(np.asarray(signals, np.float64), -1.0, 1.0)):
        row, col = divmod(i, num_cols)
        left, top = pad + col * (width + pad), pad + row * (height + pad)
        draw.rectangle([left, top, left + width - 1, top + height - 1], fill=(245, 245, 245))
        mid = top + (height - 1) / 2
        draw.line([(left, mid), (left + width - 1, mid)], fill=(200, 200, 200))
        for c in range(channels):
            ys = mid - signal[:, c] * (height - 1) / 2
            draw.line(list(zip(left + xs, ys, strict=True)), fill=_COLORS[c % len(_COLORS)])
    return np.asarray(canvas)


def save_wav(path: str, signals: np.ndarray, sample_rate: int = SAMPLE_RATE, gap: float = 0.1):
    """Writes signals [N, L, C] in [-1, 1] as one 16-bit PCM WAV with C channels: the N signals
    one after another, `gap` seconds of silence between them. Creates parent folders."""
    signals = np.clip(np.asarray(signals, np.float64), -1.0, 1.0)
    n, _, channels = signals.shape
    silence = np.zeros((int(gap * sample_rate), channels))
    parts = [p for s in signals for p in (s, silence)][:-1] if n else []
    pcm = np.round(np.concatenate(parts) * 32767).astype("<i2") if parts else np.zeros(0, "<i2")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with wave.open(path, "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())
