// Wire formats of the transfer engine, apart from UCX: the printable region descriptor that peers
// exchange, and "host:port" peer addresses.
#pragma once
#include <sys/socket.h>

#include <cstdint>
#include <string>

#include "core/result.h"

namespace larder::transfer::wire {

struct Desc {
  uint64_t base = 0, size = 0;  // the region in the owner's address space
  std::string rkey;             // UCX's packed remote key
};

// "lxd1." + base64url(u64 base, u64 size, u32 rkey_len, rkey, u64 fnv1a64 of all before): the tag
// names the format, the checksum turns a corrupt string into an error before UCX sees the rkey.
std::string encode_desc(uint64_t base, uint64_t size, const void* rkey, size_t rkey_len);
Result<Desc> decode_desc(const std::string& s);

// getaddrinfo of host (empty: any address when passive) and port.
Result<sockaddr_storage> resolve(const std::string& host, int port, bool passive, socklen_t* len);
// "host:port" or "[v6]:port".
bool split_address(const std::string& a, std::string* host, int* port);

}  // namespace larder::transfer::wire
