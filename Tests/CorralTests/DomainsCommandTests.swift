import Foundation
import Libvirt
import Testing
import TestSupport

/// `corral domains` and `corral host`, run as a user runs them: the real
/// binary in its own process.
@Suite("corral domains and host commands")
struct DomainsCommandTests {
    /// Each `corral` process gets its own test driver, holding one running
    /// domain named `test`.
    static let testURI = "test:///default"

    @Test("domains list prints a table of every domain")
    func listTable() async throws {
        let result = try await runCorral(["domains", "list", "--uri", Self.testURI])
        #expect(result.status == 0, "\(result.stderr)")
        let lines = result.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first?.split(separator: " ", omittingEmptySubsequences: true) == [
            "NAME", "STATE", "VCPUS", "MEMORY", "UPTIME", "ADDRESSES", "INSTANCE", "APPLIANCE",
        ])
        let row = try #require(lines.first { $0.hasPrefix("test ") })
        #expect(row.contains("running"))
        #expect(row.contains("8192 MiB"))
    }

    @Test("domains list --json gives the same facts as structured data")
    func listJSON() async throws {
        let result = try await runCorral(["domains", "list", "--uri", Self.testURI, "--json"])
        #expect(result.status == 0, "\(result.stderr)")
        let rows = try #require(try JSONSerialization.jsonObject(with: Data(result.stdout.utf8)) as? [[String: Any]])
        let test = try #require(rows.first { $0["name"] as? String == "test" })
        #expect(test["state"] as? String == "running")
        #expect(test["vcpus"] as? Int == 2)
        #expect(test["memory_mib"] as? Int == 8192)
        #expect((test["uuid"] as? String)?.count == 36)
    }

    @Test("domains show prints one domain in full")
    func show() async throws {
        let result = try await runCorral(["domains", "show", "test", "--uri", Self.testURI])
        #expect(result.status == 0, "\(result.stderr)")
        #expect(result.stdout.contains("Name:         test"))
        #expect(result.stdout.contains("State:        running"))
        #expect(result.stdout.contains("Disk vda:     /guest/diskimage1"))
    }

    @Test("an unknown domain is one line on stderr and exit code 1")
    func unknownDomain() async throws {
        let result = try await runCorral(["domains", "show", "no-such-vm", "--uri", Self.testURI])
        #expect(result.status == 1)
        #expect(result.stdout.isEmpty)
        let lines = result.stderr.split(separator: "\n")
        #expect(lines.count == 1, "\(result.stderr)")
        #expect(result.stderr.hasPrefix("corral: "))
        #expect(result.stderr.contains("look up domain 'no-such-vm' failed: Domain not found"))
        #expect(result.stderr.contains(Self.testURI))
    }

    @Test("unreachable libvirt is one line naming the URI and the fix, exit code 1")
    func unreachable() async throws {
        let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"
        let result = try await runCorral(["domains", "list", "--uri", uri])
        #expect(result.status == 1)
        #expect(result.stdout.isEmpty)
        #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
        #expect(result.stderr.contains("cannot connect to libvirt at \(uri)"))
        #expect(result.stderr.contains("scripts/setup"))
    }

    @Test("bad options are refused with the reason")
    func badOptions() async throws {
        let result = try await runCorral(["domains", "show", "test", "--console-lines=-3", "--uri", Self.testURI])
        #expect(result.status != 0)
        #expect(result.stderr.contains("--console-lines must be 0 or more"))
        let setting = try await runCorral(["host", "virt-type", "--setting", "hyperv", "--uri", Self.testURI])
        #expect(setting.status != 0)
        #expect(setting.stderr.contains("hyperv"))
    }

    @Test("host info and virt-type report the host")
    func host() async throws {
        let info = try await runCorral(["host", "info", "--uri", Self.testURI, "--json"])
        #expect(info.status == 0, "\(info.stderr)")
        let facts = try #require(try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any])
        #expect((facts["node"] as? [String: Any])?["cpus"] as? Int == 16)
        #expect(facts["uri"] as? String == Self.testURI)

        let configured = try await runCorral(["host", "virt-type", "--setting", "qemu", "--uri", Self.testURI])
        #expect(configured.stdout == "qemu\tconfigured as qemu\n")
    }

    @Test("on qemu:///system, a booted guest shows with its Corral owner and console")
    func realGuest() async throws {
        try await SystemLibvirt.shared {
            let guest = try await TestGuest.shared()
            let scratch = try Paths.scratchDirectory("cli")
            defer { try? FileManager.default.removeItem(at: scratch) }
            let console = scratch.appendingPathComponent("console.log").path
            let name = "corral-test-cli-\(UUID().uuidString.prefix(8).lowercased())"
            let connection = try await Connection.open(SystemLibvirt.uri)
            let domain = try await connection.createTransientDomain(
                xml: guest.domainXML(name: name, consoleLog: console, memoryMiB: 160))
            do {
                try await domain.setInstanceMetadata(InstanceMetadata(instance: "inst-42", appliance: "rack-9"))
                try await waitForText(TestGuest.readyMarker, inFile: console, timeout: TestGuest.bootTimeout)

                let list = try await runCorral(["domains", "list"])
                #expect(list.status == 0, "\(list.stderr)")
                let row = try #require(list.stdout.split(separator: "\n").first { $0.hasPrefix(name) })
                let cells = row.split(separator: " ", omittingEmptySubsequences: true).map(String.init)
                #expect(cells.starts(with: [name, "running", "(booted)", "1", "160", "MiB"]))
                #expect(cells.suffix(2) == ["inst-42", "rack-9"])

                let show = try await runCorral(["domains", "show", name, "--console-lines", "5"])
                #expect(show.status == 0, "\(show.stderr)")
                #expect(show.stdout.contains("Instance:     inst-42"))
                #expect(show.stdout.contains("Console log:  \(console)"))
                #expect(show.stdout.contains(TestGuest.readyMarker))

                let json = try await runCorral(["domains", "show", name, "--json"])
                let detail = try #require(try JSONSerialization.jsonObject(with: Data(json.stdout.utf8)) as? [String: Any])
                let summary = try #require(detail["summary"] as? [String: Any])
                #expect((summary["instance"] as? [String: Any])?["appliance"] as? String == "rack-9")
                #expect(summary["uptime_seconds"] as? Int != nil)
            } catch {
                try? await domain.destroy()
                throw error
            }
            try await domain.destroy()
            await connection.close()
        }
    }
}
