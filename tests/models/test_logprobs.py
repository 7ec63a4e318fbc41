"""Chunked log-probs against a plain full-vocabulary log-softmax."""

import pytest
import torch

from vlrlhf.models.logprobs import chunked_token_logprobs, sequence_logprobs


def reference(hidden, head, labels):
    logps = torch.log_softmax(head(hidden).double(), dim=-1)
    out = torch.zeros(labels.shape, dtype=torch.float64)
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                out[b, t] = logps[b, t - 1, labels[b, t]]
    return out


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1024])
def test_chunked_matches_full_softmax_values_and_gradients(chunk_size):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[:, :3] = -100
    labels[1, 6:] = -100
    got = chunked_token_logprobs(hidden, head, labels, chunk_size=chunk_size)
    want = reference(hidden, head, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    got.sum().backward()
    chunked_grad = hidden.grad.clone()
    hidden.grad = None
    want.sum().backward()
    torch.testing.assert_close(chunked_grad, hidden.grad.float(), atol=1e-5, rtol=0)


def test_bf16_hidden_states_give_fp32_logprobs():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).bfloat16()
    hidden = torch.randn(2, 5, 16).bfloat16()
    labels = torch.randint(0, 50, (2, 5))
    out = chunked_token_logprobs(hidden, head, labels, chunk_size=2)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and (out[:, 1:] < 0).all()


def test_sequence_sum_and_mean():
    logps = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -4.0, 0.0, 0.0]])
    mask = torch.tensor([[False, True, True, False], [False, True, False, False]])
    assert sequence_logprobs(logps, mask).tolist() == [-3.0, -4.0]
    assert sequence_logprobs(logps, mask, average=True).tolist() == [-1.5, -4.0]
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logprobs(torch.zeros(1, 2, 4), torch.nn.Identity(), torch.zeros(1, 2, dtype=torch.long), 0)
