"""Drop-folder results wait for the one encoder process, and workers can make audio faster
than it encodes: a burst of long drops must not pile up their finished audio in the
supervisor (jobs.MAX_ENCODING_BYTES), and every drop is still served."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.daemon import Daemon, peak_rss_bytes

TONE = {"name": "tests.engines.faulty:load"}  # fast: 975 s of audio for the text below
TEXT = " ".join(f"Sentence number {n} is here to make a long text for the encoder."
                for n in range(300))
DROPS = 10  # each 975 s of audio, asked for at 48 kHz: 179 MiB of float32 to encode


def test_a_burst_of_long_drops_waits_for_the_encoder_before_it_starts(
        tmp_path: Path) -> None:
    """The drop folder stopped reading drops while the encoder held MAX_ENCODING_BYTES,
    but the drops already read all went to the workers, and each finished result waited
    in the supervisor for the encoder: 10 as Ogg files grew its peak 1,246 MiB. A new drop
    now starts only while the encoder has room; the peak grew 544 MiB (the bound, a result
    that passes it, the job in progress)."""
    daemon = Daemon(tmp_path, engine=TONE, cache={"max_bytes": 0},
                    scheduling={"max_active_jobs": 1})
    daemon.start()
    try:
        assert daemon.process is not None
        before = peak_rss_bytes(daemon.process.pid)
        staging = tmp_path / "burst"
        staging.mkdir()
        for n in range(DROPS):
            (staging / f"long-{n:02}.json").write_text(json.dumps(
                {"text": TEXT, "format": "ogg", "sample_rate": 48000}))
        for path in sorted(staging.iterdir()):
            os.rename(path, daemon.inbox / path.name)
        for n in range(DROPS):
            record = daemon.wait_done(f"long-{n:02}.json", timeout_s=180)
            assert (record["sample_rate"], record["format"]) == (48000, "ogg")
            assert abs(record["audio_s"] - len(TEXT) * 0.05) < 30
        grown = peak_rss_bytes(daemon.process.pid) - before
        assert grown < 850 << 20, f"the supervisor's peak grew {grown >> 20} MiB"
    finally:
        daemon.stop()
