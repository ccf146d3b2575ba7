"""engine/dimoo/ids.py against the numbers of ../shared/DIMOO.md sections 1.4, 1.5 and 1.6."""

import pytest
import torch

from engine.dimoo import ids
from engine.dimoo.ids import DIMOO_IDS, DimooIds


def test_constants_are_the_fact_sheet_numbers():
    # DIMOO.md 1.4: mask, newline, BOI/EOI, uncondition, answer, pad, code offset; 1.3: logits width
    assert (ids.MASK, ids.NEWLINE, ids.BOI, ids.EOI, ids.UNCONDITION) == (126336, 126084, 126349, 126350, 126351)
    assert (ids.BOA, ids.EOA, ids.ANSWER_PAD, ids.ENDOFTEXT, ids.EOT) == (126354, 126355, 126339, 126081, 126348)
    assert (ids.TEXT_VOCAB_SIZE, ids.CODEBOOK_SIZE, ids.VOCAB_SIZE) == (126356, 8192, 134548)
    assert DIMOO_IDS.image_offset == 134548 - 8192 == 126356  # the sampler's `logits.size(-1) - 8192`
    assert DIMOO_IDS.image_slice == slice(126356, 134548)
    specials = {*DIMOO_IDS.specials().values(), *ids.CHAT_TAG_IDS.values()}
    assert len(specials) == 13 and max(specials) < ids.TEXT_VOCAB_SIZE  # distinct text ids


def test_code_id_round_trip_and_bounds(gen):
    codes = torch.randint(0, 8192, (3, 17), generator=gen)
    tok = DIMOO_IDS.code_to_id(codes)
    assert torch.equal(tok, codes + 126356) and bool(DIMOO_IDS.is_image(tok).all())
    assert torch.equal(DIMOO_IDS.id_to_code(tok), codes)
    assert DIMOO_IDS.code_to_id(torch.tensor([0, 8191])).tolist() == [126356, 134547]
    assert not bool(DIMOO_IDS.is_image(torch.tensor([ids.MASK, ids.NEWLINE, 126355, 134548])).any())
    for bad in (torch.tensor([8192]), torch.tensor([-1]), torch.tensor([0.5])):
        with pytest.raises(ValueError, match="codes"):
            DIMOO_IDS.code_to_id(bad)
    with pytest.raises(ValueError, match="ids"):
        DIMOO_IDS.id_to_code(torch.tensor([ids.MASK]))


@pytest.mark.parametrize(("px", "length"), [((512, 512), 1056), ((1024, 1024), 4160), ((768, 1536), 48 * 97)])
def test_grid_lengths_of_the_fact_sheet(px, length):
    h, w = ids.grid_shape(*px)
    assert DimooIds.grid_length(h, w) == length  # DIMOO.md 1.6: 512 px -> 32 x 33, 1024 px -> 64 x 65
    with pytest.raises(ValueError, match="image size"):
        ids.grid_shape(px[0] + 8, px[1])


def test_newlines_after_every_row_the_last_too(gen):
    h, w = 3, 5
    codes = torch.randint(0, 8192, (2, h, w), generator=gen)
    flat = DIMOO_IDS.add_newlines(DIMOO_IDS.code_to_id(codes))
    assert flat.shape == (2, h * (w + 1))
    # written out by hand: row r's tokens then 126084, for every row
    expected = [sum(([126356 + int(c) for c in codes[b, r]] + [126084] for r in range(h)), []) for b in range(2)]
    assert flat.tolist() == expected
    assert flat[0, DIMOO_IDS.newline_positions(h, w)].eq(126084).all()
    assert torch.equal(flat[:, DIMOO_IDS.code_positions(h, w)], DIMOO_IDS.code_to_id(codes).flatten(1))
    assert torch.equal(DIMOO_IDS.strip_newlines(flat, h, w), DIMOO_IDS.code_to_id(codes))
    with pytest.raises(ValueError, match="newline"):
        DIMOO_IDS.strip_newlines(flat.roll(1, -1), h, w)
    with pytest.raises(ValueError, match="tokens"):
        DIMOO_IDS.strip_newlines(flat, w, h)
    masked = DIMOO_IDS.mask_grid(h, w)
    assert masked[0, DIMOO_IDS.code_positions(h, w)].eq(126336).all()
    assert masked[0, DIMOO_IDS.newline_positions(h, w)].eq(126084).all()


def test_compact_layout_keeps_codes_last():
    c = DimooIds.compact(128, 64)
    assert c.vocab_size == 128 + 9 + 64 and c.image_slice == slice(137, 201) and c.mask == 128
    assert set(c.specials().values()) == set(range(128, 137))
    with pytest.raises(ValueError, match="text_vocab_size"):
        DimooIds.compact(0, 64)
    with pytest.raises(ValueError, match="codebook_size"):
        DimooIds(vocab_size=100, codebook_size=100)
