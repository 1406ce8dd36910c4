import Foundation
import Testing
import TestSupport

/// The systemd units in etc/systemd, as `scripts/install` installs them.
@Suite("systemd units")
struct SystemdUnitTests {
    static let units = ["corral-pool.service", "corral-agent.service"]

    func unitText(_ name: String) throws -> String {
        try String(contentsOf: Paths.packageRoot.appendingPathComponent("etc/systemd/\(name)"), encoding: .utf8)
    }

    @Test("systemd-analyze verify passes on both units with nothing to say (warnings are failures here)")
    func verify() async throws {
        let directory = try Paths.scratchDirectory("units")
        defer { try? FileManager.default.removeItem(at: directory) }
        // verify checks that ExecStart's program exists: point it at the built one.
        var paths: [String] = []
        for unit in Self.units {
            let text = try unitText(unit).replacingOccurrences(of: "/usr/local/bin/corral", with: Paths.corralBinary.path)
            let path = directory.appendingPathComponent(unit).path
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            paths.append(path)
        }
        let result = try await runProgram("systemd-analyze", ["verify"] + paths)
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.isEmpty && result.stderr.isEmpty, "\(result.stdout)\(result.stderr)")
        // And it does speak up: an unknown key and a program that is not there.
        let broken = directory.appendingPathComponent("broken.service").path
        try (try unitText("corral-pool.service").replacingOccurrences(of: "Restart=on-failure", with: "Restart=sometimes"))
            .write(toFile: broken, atomically: true, encoding: .utf8)
        let complaint = try await runProgram("systemd-analyze", ["verify", broken])
        #expect(complaint.stderr.contains("Failed to parse service restart specifier"), "\(complaint.stderr)")
    }

    @Test("the units restart on failure, are hardened, and order the agent after libvirtd")
    func hardening() throws {
        for unit in Self.units {
            let lines = Set(try unitText(unit).split(separator: "\n").map(String.init))
            for wanted in [
                "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                "ReadWritePaths=/var/lib/corral", "WantedBy=multi-user.target",
            ] {
                #expect(lines.contains(wanted), "\(unit) lacks \(wanted)")
            }
        }
        let pool = try unitText("corral-pool.service")
        #expect(pool.contains("\nCapabilityBoundingSet=\n"), "the pool keeps no capability")
        #expect(pool.contains("ExecStart=/usr/local/bin/corral pool serve --config /etc/corral/pool.toml\n"))
        let agent = try unitText("corral-agent.service")
        #expect(agent.contains("\nAfter=network-online.target libvirtd.service virtlogd.service\n"))
        #expect(agent.contains("ExecStart=/usr/local/bin/corral agent run --config /etc/corral/agent.toml\n"))
    }
}
