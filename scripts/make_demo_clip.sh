#!/usr/bin/env bash
# Regenerate the demo clip the README's first command transcribes:
#   specwhisper/assets/demo.wav  16 kHz, mono, 16-bit PCM, about 6 s of speech
#   specwhisper/assets/demo.txt  the sentence it speaks, exactly
#
# The voice is espeak-ng's (synthetic, so the clip is ours to ship). espeak-ng
# writes 22050 Hz; sox (or ffmpeg when sox is absent) resamples to Whisper's 16 kHz.
# Needs: espeak-ng, and sox or ffmpeg   (apt-get install -y espeak-ng sox)
set -euo pipefail

SENTENCE="Speculative decoding lets a small model draft the words, and the large model checks them all at once."
VOICE="en-us"
WORDS_PER_MINUTE=175  # espeak-ng's default pace: clear, and keeps the clip under 6 s

ASSETS="$(cd "$(dirname "$0")/.." && pwd)/specwhisper/assets"
mkdir -p "$ASSETS"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

command -v espeak-ng >/dev/null || { echo "espeak-ng not found: apt-get install -y espeak-ng" >&2; exit 1; }
espeak-ng -v "$VOICE" -s "$WORDS_PER_MINUTE" -w "$tmp/speech_22k.wav" "$SENTENCE"

if command -v sox >/dev/null; then
    # rate -v: sox's very-high-quality band-limited resampler; -D: no dither, so reruns are byte-identical
    sox -D "$tmp/speech_22k.wav" -r 16000 -c 1 -b 16 -e signed-integer "$ASSETS/demo.wav" rate -v
elif command -v ffmpeg >/dev/null; then
    ffmpeg -nostdin -hide_banner -loglevel error -y -i "$tmp/speech_22k.wav" \
        -ar 16000 -ac 1 -c:a pcm_s16le -map_metadata -1 -fflags +bitexact "$ASSETS/demo.wav"
else
    echo "need sox or ffmpeg to resample to 16 kHz: apt-get install -y sox" >&2
    exit 1
fi

printf '%s\n' "$SENTENCE" > "$ASSETS/demo.txt"
echo "wrote $ASSETS/demo.wav ($(stat -c %s "$ASSETS/demo.wav") bytes) and demo.txt"
