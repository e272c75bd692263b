"""The publish side: the one way a message leaves carrot.

- `outgoing`: check a task call and build the immutable message (`prepare`);
- `outbox`: write the row, send on commit, record the broker's answer (store-and-forward);
- `relay`: send the rows left waiting for the broker;
- `arguments`: how task arguments are stored in rows, written and read back.
"""
