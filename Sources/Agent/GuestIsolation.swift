import Foundation
import Support

/// Keeps guests under user-mode networking away from the host's loopback.
///
/// QEMU's user-mode NAT maps the guest's gateway, 10.0.2.2, to the host's
/// 127.0.0.1: without this a guest reaches the pool, image servers and
/// every other guest's SSH forward. Each guest connection becomes a socket
/// of the QEMU process, which runs as `libvirt.qemu_user`, so one nftables table
/// refuses that user's new connections that leave through the loopback
/// interface: a TCP SYN gets a reset, a UDP datagram an ICMP refusal. DNS
/// (port 53) stays open, because user-mode NAT forwards the guest's
/// resolver (10.0.2.3) to the host's, which is often on loopback.
/// Nothing else is matched: connections to other interfaces (the guest's
/// internet access) pass, and so does the guest's SSH forward, which the
/// host's client opens *into* QEMU (QEMU only answers on it).
///
/// The table is replaced whole, in one transaction, each time an agent
/// starts, and stays when the agent stops: guests outlive it.
enum GuestIsolation {
    static let table = "corral_guests"

    static func ruleset(qemuUser: String) -> String {
        let match = "oifname \"lo\" meta skuid \"\(qemuUser)\""
        return """
            table inet \(table)
            delete table inet \(table)
            table inet \(table) {
                chain output {
                    type filter hook output priority filter; policy accept;
                    \(match) udp dport 53 accept
                    \(match) tcp dport 53 accept
                    \(match) tcp flags & (syn | ack) == syn reject with tcp reset
                    \(match) meta l4proto udp reject
                }
            }

            """
    }

    /// Installs the table; an error says what failed and how to fix it.
    static func apply(qemuUser: String, scratch: String) async throws {
        let file = "\(scratch)/guest-isolation.nft"
        do {
            try ruleset(qemuUser: qemuUser).write(toFile: file, atomically: true, encoding: .utf8)
        } catch {
            throw AgentFatalError("cannot write \(file): \(error)")
        }
        defer { try? FileManager.default.removeItem(atPath: file) }
        let result: ProgramResult
        do {
            result = try await runProgram("nft", ["-f", file])
        } catch {
            throw AgentFatalError(
                "cannot keep guests from the host's loopback: nft did not run (\(error)); install nftables (scripts/setup does) or set network.isolate_host = false in agent.toml")
        }
        guard result.status == 0 else {
            throw AgentFatalError(
                "cannot keep guests from the host's loopback: nft -f failed: \(result.stderr.trimmingCharacters(in: .whitespacesAndNewlines)); check libvirt.qemu_user (\(qemuUser)) names the user QEMU runs as, or set network.isolate_host = false in agent.toml")
        }
    }
}
