//! Pure policy core: inputs (mesh config, namespace and pod annotations) → effective policy →
//! compiled trie entries. No kube client and no aya in here.
