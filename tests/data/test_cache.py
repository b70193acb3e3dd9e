"""Decode once: the cache holds the reference pixels, is reused, and is never read half-built."""

import os
import signal
import subprocess
import sys
import time
import textwrap
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from gist_exp.data.cache import cached_split, entry_dir
from gist_exp.data.datamodule import VTabDataModule
from gist_exp.data.images import decode_image
from gist_exp.data.tasks import TASKS
from gist_exp.data.vtab import load_protocol
from gist_exp.errors import DataError
from gist_exp.models.vit import NORMALIZATIONS, PixelNormalize

DTD = TASKS["dtd"]


def test_cached_and_pil_pipelines_give_the_same_tensors(small_root, tmp_path):
    batches = {}
    for pipeline in ("cached", "pil"):
        dm = VTabDataModule(small_root, DTD, image_size=32, pipeline=pipeline, cache_dir=tmp_path / "cache",
                            batch_size=8, eval_batch_size=7, num_workers=0, seed=3)
        dm.setup()
        batches[pipeline] = ([b for b in dm.train_dataloader()], [b for b in dm.test_dataloader()])
    for (cached, pil) in zip(*[batches[p] for p in ("cached", "pil")]):
        assert len(cached) == len(pil) > 0
        for (ci, cl), (pi, pl) in zip(cached, pil):
            assert ci.dtype == pi.dtype == torch.uint8
            assert torch.equal(ci, pi) and torch.equal(cl, pl)  # same pixels, same order
    assert len(batches["cached"][0]) == 40 // 8  # drop_last


def test_normalised_pixels_equal_the_reference_torchvision_pipeline(small_root):
    path = small_root / "dtd/images/test/000000.jpg"
    mean, std = NORMALIZATIONS["0.5"]
    reference = transforms.Compose([transforms.Resize((224, 224), interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    expected = reference(Image.open(path).convert("RGB"))
    ours = PixelNormalize(mean, std)(torch.from_numpy(decode_image(path, 224))[None])[0]
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_image_modes_are_converted_to_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else rgb.convert("L").convert("I;16")
    path = tmp_path / ("x.png" if mode in ("RGBA", "P", "I;16") else "x.jpg")
    image.save(path)
    out = decode_image(path, 16)
    assert out.shape == (3, 16, 16) and out.dtype == np.uint8
    assert np.array_equal(out, np.asarray(Image.open(path).convert("RGB").resize((16, 16), Image.BICUBIC)).transpose(2, 0, 1))


def test_corrupt_and_truncated_images_are_all_named(small_root, tmp_path):
    test_images = small_root / "dtd/images/test"
    data = (test_images / "000001.jpg").read_bytes()
    (test_images / "000001.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (test_images / "000004.jpg").write_bytes(b"this is not a jpeg")  # corrupt
    _, test = load_protocol(small_root, DTD, "final")
    with pytest.raises(DataError) as error:
        cached_split(test, tmp_path, 32, num_workers=0)
    message = str(error.value)
    assert "2 image(s) of dtd/test cannot be decoded" in message
    assert f"{test_images / '000001.jpg'}: cannot decode" in message and "truncated" in message
    assert f"{test_images / '000004.jpg'}: cannot decode" in message and "line 5" in message
    assert not entry_dir(tmp_path, test, 32).exists()
    assert not [p for p in (tmp_path / "dtd").iterdir() if ".tmp-" in p.name]


def test_cache_is_built_once_and_reused(small_root, tmp_path):
    train, _ = load_protocol(small_root, DTD, "final")
    first = cached_split(train, tmp_path, 32, num_workers=0)
    mtime = (first.path / "images.npy").stat().st_mtime_ns
    second = cached_split(train, tmp_path, 32, num_workers=0)
    assert second.path == first.path and (second.path / "images.npy").stat().st_mtime_ns == mtime
    assert np.array_equal(second.images, first.images) and list(second.labels) == list(train.labels)
    os.utime(train.paths[0], ns=(1, 1))  # a changed image file gets a new entry, never stale pixels
    assert cached_split(train, tmp_path, 32, num_workers=0).path != first.path


BUILD = textwrap.dedent("""
    import sys, time
    import gist_exp.data.images as images
    from gist_exp.data.cache import cached_split
    from gist_exp.data.tasks import TASKS
    from gist_exp.data.vtab import load_protocol
    decode = images.decode_image
    def slow(path, size):
        time.sleep(float(sys.argv[3]))
        return decode(path, size)
    images.decode_image = slow
    _, test = load_protocol(sys.argv[1], TASKS["dtd"], "final")
    entry = cached_split(test, sys.argv[2], 32, num_workers=0)
    print("ENTRY", entry.path, flush=True)
""")


def test_killed_build_leaves_no_entry_that_reads_as_complete(small_root, tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(small_root), str(cache), "0.2"])
    deadline = time.time() + 60
    while time.time() < deadline and not list((cache / "dtd").glob(".*.tmp-*")):
        time.sleep(0.05)
    time.sleep(0.5)  # a few images in
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, test = load_protocol(small_root, DTD, "final")
    assert not entry_dir(cache, test, 32).exists()  # only the temporary directory was left behind
    entry = cached_split(test, cache, 32, num_workers=0)
    assert entry.images.shape == (20, 3, 32, 32) and entry.images[-1].any()


def test_concurrent_builds_agree_and_build_once(small_root, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", "import logging; logging.basicConfig(level=logging.INFO)\n" + BUILD,
                               str(small_root), str(cache), "0.02"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    entries = {line.split()[1] for out in outputs for line in out.splitlines() if line.startswith("ENTRY")}
    assert len(entries) == 1
    assert sum(out.count("cached dtd/test") for out in outputs) == 1  # the second job waited and reused it


def test_evaluation_stream_ends_its_reader_when_the_consumer_stops_early(small_root, tmp_path):
    dm = VTabDataModule(small_root, DTD, image_size=32, cache_dir=tmp_path / "cache", eval_batch_size=10,
                        num_workers=0)
    dm.setup()
    stream = dm.test_dataloader()  # 20 test images: 2 batches
    stream.prefetch = 1
    before = threading.active_count()
    batches = iter(stream)
    next(batches)
    time.sleep(0.3)  # the reader has queued the last batch and is waiting to queue the end marker
    closing = threading.Thread(target=batches.close)
    closing.start()
    closing.join(timeout=10)
    assert not closing.is_alive(), "closing the stream hangs on its reader thread"
    assert threading.active_count() == before
