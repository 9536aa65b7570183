// placeholder: etcd client (being written)
