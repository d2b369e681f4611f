"""Reference loss ops: softmax + cross-entropy (BP1) in one call."""


class LossOps:
    """Plain-xp loss ops (a mixin of ``ReferenceOps``: uses ``self.xp``)."""

    # ---- BP1 for softmax + cross-entropy --------------------------------------------------------
    def softmax_ce(self, logits, labels, dlogits, loss_rows):
        """Per-row loss logsumexp(z) − z[y] into ``loss_rows``; dlogits = (softmax(z) − onehot(y))/B."""
        xp = self.xp
        B = logits.shape[0]
        # Subtract the row max before exp (log-sum-exp) so exp never overflows.
        m = logits.max(axis=1, keepdims=True)
        e = xp.exp(logits - m)
        s = e.sum(axis=1, keepdims=True)
        rows = xp.arange(B)
        loss_rows[...] = (xp.log(s) + m)[:, 0] - logits[rows, labels]
        dlogits[...] = e / s
        dlogits[rows, labels] -= 1
        dlogits /= B
        return dlogits, loss_rows
