import Foundation
import Libvirt
import Logging
import PoolAPI
import Support
import Testing
import TestSupport

@testable import Agent

@Suite("Agent configuration")
struct AgentConfigurationTests {
    @Test("etc/corral/agent.toml lists every key at its default")
    func exampleFile() throws {
        let example = try AgentConfiguration.load(path: Paths.packageRoot.appendingPathComponent("etc/corral/agent.toml").path)
        #expect(example == AgentConfiguration())
    }

    @Test("what register writes reads back the same")
    func roundTrip() throws {
        var configuration = AgentConfiguration(poolURL: "https://pool.example.org", tokenFile: "/etc/corral/\"odd\".token")
        configuration.network = .user(sshForwardPorts: 22000...22099)
        configuration.virtualization = .qemu
        configuration.images.allow = ["127.0.0.0/8", "fd00::/8"]
        configuration.images.ports = [8080]
        configuration.images.requireSHA256 = false
        configuration.images.maxBytes = 1 << 30
        configuration.isolateHost = false
        configuration.qemuUser = "qemu"
        configuration.qemuGroup = "kvm"
        configuration.caFile = "/etc/corral/pool-ca.pem"
        configuration.publicAddress = "rack-1.example.org"
        configuration.metricsListen = ("::1", 9464)
        #expect(try AgentConfiguration.parse(configuration.rendered()) == configuration)
        #expect(try AgentConfiguration.parse(configuration.rendered()).metricsListen! == ("::1", 9464))
        configuration.network = .bridge("br0")
        #expect(try AgentConfiguration.parse(configuration.rendered()) == configuration)
    }

    @Test("mistakes name the key and the fix", arguments: [
        ("[pool]\nurl = \"ftp://x\"", "agent.toml: pool.url: must be an http or https URL such as \"http://127.0.0.1:8080\" (it is \"ftp://x\")"),
        ("[libvirt]\nvirt_type = \"xen\"", "agent.toml: libvirt.virt_type: must be one of \"auto\", \"kvm\", \"qemu\" (it is \"xen\")"),
        ("[network]\nmode = \"bridge\"", "agent.toml: network.name: is required for mode \"bridge\": the libvirt bridge's name"),
        ("[network]\nssh_forward_ports = \"80-90\"", "agent.toml: network.ssh_forward_ports: must be a port range such as \"22000-22999\" within 1024-65535 (it is \"80-90\")"),
        ("[builds]\nmax_concurrent = 0", "agent.toml: builds.max_concurrent: must be between 1 and 64 (it is 0)"),
        ("[paths]\nstate_dir = \"state\"", "agent.toml: paths.state_dir: must be an absolute path (it is \"state\")"),
        ("[check_in]\nperiod = 5", "agent.toml: check_in.period: unknown key; [check_in] takes jitter_seconds, period_seconds"),
        ("[metrics]\nlisten = \"127.0.0.1:99999\"", "agent.toml: metrics.listen: must be HOST:PORT such as \"127.0.0.1:9464\" or \"[::1]:9464\", port 0 to 65535 (it is \"127.0.0.1:99999\")"),
        ("[metrics]\nlisten = \"9464\"", "agent.toml: metrics.listen: must be HOST:PORT such as \"127.0.0.1:9464\" or \"[::1]:9464\", port 0 to 65535 (it is \"9464\")"),
    ])
    func mistakes(text: String, message: String) {
        #expect(throws: ConfigurationError.self) { try AgentConfiguration.parse(text) }
        do {
            _ = try AgentConfiguration.parse(text)
        } catch {
            #expect("\(error)" == message)
        }
    }

    @Test("the token file must be private and hold one line")
    func tokenFile() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("corral-token-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("token").path
        let configuration = AgentConfiguration(tokenFile: path)
        #expect(throws: ConfigurationError.self) { try configuration.readToken() }
        FileManager.default.createFile(atPath: path, contents: Data("secret\n".utf8), attributes: [.posixPermissions: 0o644])
        do {
            _ = try configuration.readToken()
            Issue.record("a world-readable token file was accepted")
        } catch let error as ConfigurationError {
            #expect(error.reason.contains("run `chmod 600 \(path)`"))
        }
        try FileManager.default.setAttributes([.posixPermissions: 0o600], ofItemAtPath: path)
        #expect(try configuration.readToken() == "secret")
    }
}

@Suite("Agent parts")
struct AgentPartsTests {
    static func scratch() throws -> URL {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("corral-parts-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        return directory
    }

    @Test("images that point at other files, or are not what they claim, are refused")
    func imageChecks() async throws {
        let directory = try Self.scratch()
        defer { try? FileManager.default.removeItem(at: directory) }
        func qemuImg(_ arguments: [String]) async throws {
            let result = try await runProgram("qemu-img", arguments)
            #expect(result.status == 0, "\(result.stderr)")
        }
        let base = directory.appendingPathComponent("base.qcow2").path
        let backed = directory.appendingPathComponent("backed.qcow2").path
        let external = directory.appendingPathComponent("external.qcow2").path
        let raw = directory.appendingPathComponent("plain.raw").path
        try await qemuImg(["create", "-q", "-f", "qcow2", base, "16M"])
        try await qemuImg(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, backed])
        try await qemuImg(["create", "-q", "-f", "qcow2", "-o", "data_file=\(directory.path)/data.raw", external, "16M"])
        try await qemuImg(["create", "-q", "-f", "raw", raw, "16M"])

        func admit(_ path: String, _ format: String, _ what: String) async throws {
            try await ImageGate.admit(path, declared: format, what: what, qemuUser: "libvirt-qemu")
        }
        func refusal(_ path: String, _ format: String, _ what: String) async -> String {
            do {
                try await admit(path, format, what)
                return "accepted"
            } catch {
                return "\(error)"
            }
        }
        try await admit(base, "qcow2", "image 'base'")
        try await admit(raw, "raw", "image 'plain'")
        #expect(
            await refusal(backed, "qcow2", "image 'backed'")
                == "image 'backed' is refused: its qcow2 header names a backing file; upload a self-contained image (qemu-img convert)")
        #expect(
            await refusal(backed, "raw", "image 'backed'")
                == "image 'backed' is declared raw but its bytes are qcow2; declare its real format or convert it (qemu-img convert -O raw)")
        #expect(await refusal(external, "qcow2", "image 'external'").hasPrefix("image 'external' is refused: its qcow2 header names an external data file"))
        #expect(await refusal(base, "raw", "image 'base'").hasPrefix("image 'base' is declared raw but its bytes are qcow2"))
        #expect(
            await refusal(raw, "qcow2", "image 'plain'")
                == "image 'plain' is not a valid qcow2 image: its bytes are not a disk image format, so raw")
        #expect(await refusal(raw, "vmdk", "image 'plain'") == "image 'plain': disk_format must be qcow2 or raw (it is 'vmdk')")
        // A VMDK descriptor names host files as its extents; qemu-img would open them.
        let descriptor = directory.appendingPathComponent("descriptor.raw")
        try "# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"/etc/shadow\" 0\n".write(
            to: descriptor, atomically: true, encoding: .utf8)
        #expect(await refusal(descriptor.path, "raw", "image 'flat'").hasPrefix("image 'flat' is declared raw but its bytes are a VMDK descriptor"))
        for (name, format) in [("vmdk", "vmdk"), ("vhdx", "vhdx"), ("vdi", "vdi"), ("vpc", "vpc"), ("qed", "qed")] {
            let path = directory.appendingPathComponent("disk.\(name)").path
            try await qemuImg(["create", "-q", "-f", format, path, "16M"])
            #expect(await refusal(path, "raw", "image '\(name)'").contains("is declared raw but its bytes are"), "\(name)")
        }
        // qemu-img's own reading agrees with the header check, run as QEMU's user.
        do {
            try await ImageGate.checkWithQemuImg(backed, format: "qcow2", what: "image 'backed'", qemuUser: "libvirt-qemu")
            Issue.record("qemu-img accepted a backing file")
        } catch let error as ImageError {
            #expect(error.description.hasPrefix("image 'backed' is refused: it names a backing file (\(base))"))
        }
    }

    @Test("the domain made from a flavor is one libvirt accepts, with Corral's metadata")
    func domainTemplate() async throws {
        let connection = try await Connection.open("test:///default", keepAlive: nil)
        let expires = Date(timeIntervalSince1970: 1_900_000_000)
        for network: AgentConfiguration.Network in [.user(sshForwardPorts: nil), .network("default"), .bridge("br0")] {
            let uuid = UUID()
            let name = "i-\(uuid.uuidString.prefix(8).lowercased())"
            let template = DomainTemplate(
                name: name, uuid: uuid.uuidString.lowercased(), virtType: "test",
                flavor: InstanceFlavor(name: "small", vcpus: 2, memory: 256, disk: 1), disk: "/var/lib/x/\(name).qcow2",
                base: ("/var/lib/images/sha256/ab", "raw"), seed: "/var/lib/x/\(name).seed.iso", consoleLog: "/var/lib/x/\(name).log", macAddress: macAddress(for: uuid),
                network: network, sshPort: nil, kernel: ("/k/vmlinuz", "/k/initrd.img", "console=ttyS0 <&>"),
                metadata: InstanceMetadata(instance: name, appliance: "rack & co", pool: "http://127.0.0.1:1", leaseExpires: expires))
            let domain = try await connection.defineDomain(xml: template.xml())
            let description = try await domain.describe()
            #expect(description.vcpus == 2)
            #expect(description.memoryKiB == 256 * 1024)
            #expect(description.consoleLogPath == "/var/lib/x/\(name).log")
            #expect(description.disks.map(\.source) == ["/var/lib/x/\(name).qcow2", "/var/lib/x/\(name).seed.iso"])
            #expect(description.interfaces.first?.macAddress == macAddress(for: uuid))
            #expect(
                try await domain.instanceMetadata()
                    == InstanceMetadata(instance: name, appliance: "rack & co", pool: "http://127.0.0.1:1", leaseExpires: expires))
            #expect(try await domain.xml().contains("<cmdline>console=ttyS0 &lt;&amp;&gt;</cmdline>"))
            try await domain.undefine()
        }
        await connection.close()
    }

    @Test("the SSH port forward is QEMU's own NIC bound to loopback")
    func sshForward() {
        let uuid = UUID()
        let template = DomainTemplate(
            name: "i-1", uuid: uuid.uuidString, virtType: "qemu", flavor: InstanceFlavor(vcpus: 1, memory: 128, disk: 1),
            disk: "/d", base: ("/b", "qcow2"), seed: "/s", consoleLog: "/c", macAddress: "52:54:00:00:00:01", network: .user(sshForwardPorts: 22000...22010),
            sshPort: 22003, kernel: nil, metadata: InstanceMetadata(instance: "i-1", appliance: "rack"))
        let xml = template.xml()
        #expect(xml.contains("<qemu:arg value='user,id=corral0,net=10.0.2.0/24,dhcpstart=10.0.2.15,hostfwd=tcp:127.0.0.1:22003-:22'/>"))
        #expect(!xml.contains("<interface"))
        #expect(xml.contains("<boot dev='hd'/>"))
    }

    @Test("outbox order, exactly-once action records and acknowledgement survive reopening the store")
    func store() async throws {
        let directory = try Self.scratch()
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("agent.sqlite").path
        do {
            let store = try AgentStore(path: path)
            for state in [InstanceState.starting, .running, .suspended] {
                try await store.enqueue(InstanceReport(name: "i-1", state: state), at: Date())
            }
            let action = Action(id: "a-1", kind: .reboot, instance: "i-1")
            #expect(try await store.apply(action, .none, at: Date()))
            #expect(try await !store.apply(action, .lease(Date()), at: Date()))
        }
        let reopened = try AgentStore(path: path)
        #expect(try await reopened.pending().map(\.report.state) == [.starting, .running, .suspended])
        let first = try #require(try await reopened.nextPending())
        try await reopened.delivered(first, at: Date())
        #expect(try await reopened.pending().map(\.report.state) == [.running, .suspended])
        #expect(try await reopened.wasApplied("a-1"))
        #expect(try await reopened.unacknowledgedActions() == ["a-1"])
        try await reopened.acknowledge(["a-1"], at: Date())
        #expect(try await reopened.unacknowledgedActions() == [])
        #expect(try await reopened.wasApplied("a-1"))
    }

    @Test("backoff grows, stays under its cap, and is jittered")
    func backoff() {
        var backoff = Backoff(base: .seconds(1), cap: .seconds(8))
        let delays = (0..<8).map { _ in backoff.next() }
        #expect(delays[0] <= .seconds(1))
        #expect(delays.allSatisfy { $0 <= .seconds(8) })
        #expect(delays[5] >= .seconds(4))
        backoff.reset()
        #expect(backoff.next() <= .seconds(1))
    }
}

@Suite("Keys actions are bounded before they reach a guest")
struct GuestKeysTests {
    @Test("a keys action with a bad user, key or script is refused with the reason; a good one passes")
    func bounds() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl carol"
        #expect(GuestKeys.problem(keys: [key], user: "debian", run: "#!/bin/sh\ntrue\n") == nil)
        #expect(GuestKeys.problem(keys: [], user: "debian", run: nil) == nil)
        for (keys, user, run, reason) in [
            ([key], "../root", nil, "is not a user name"),
            ([key], "Root", nil, "is not a user name"),
            ([key], "", nil, "is not a user name"),
            ([key + "\n" + key], "debian", nil, "not one line"),
            ([""], "debian", nil, "not one line"),
            ([String(repeating: "a", count: 9000)], "debian", nil, "longer than 8192 bytes"),
            (Array(repeating: key, count: 1001), "debian", nil, "1001 keys, more than 1000"),
            ([key], "debian", "echo no shebang", "does not start with #!"),
            ([key], "debian", "#!/bin/sh\n" + String(repeating: "x", count: 70_000), "longer than 65536 bytes"),
        ] as [([String], String, String?, String)] {
            let problem = GuestKeys.problem(keys: keys, user: user, run: run)
            #expect(problem?.contains(reason) == true, "\(user): \(problem ?? "accepted")")
        }
    }
}
