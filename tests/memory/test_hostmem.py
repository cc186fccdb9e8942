"""Host DRAM helpers: how a copy through page-by-page translation is cut."""


def test_page_spans_cut_a_range_at_4k_boundaries():
    from sandbox.memory.hostmem import page_spans
    assert list(page_spans(0x1FF0, 0x20)) == [(0x1FF0, 0, 0x10), (0x2000, 0x10, 0x10)]
    assert list(page_spans(0x3000, 0x2001)) == [(0x3000, 0, 0x1000), (0x4000, 0x1000, 0x1000), (0x5000, 0x2000, 1)]
    assert list(page_spans(0x10, 5)) == [(0x10, 0, 5)]
    assert list(page_spans(0x10, 0)) == [] and list(page_spans(0x10, -3)) == []
