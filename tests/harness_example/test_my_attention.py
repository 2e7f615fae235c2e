import pytest
import torch
from my_attention import my_attention


@pytest.mark.attention_cases(signature="sdpa", dtypes=[torch.float32, torch.bfloat16], devices=["cpu"])
def test_my_attention(attention_case):
    attention_case.check(my_attention)
